"""The report's charts: every stage's small multiples in lifecycle order, only where a curve says something:
losses (train and validation on one chart), the learning rate once, the mixture's share per source, the other
curves a stage logs, held-out metrics as points with standard-error bars, and a reasoning stage's test-time
compute curve."""

from __future__ import annotations

from typing import Any

from lmforge.eval.rundir import RunData, column, finite, lifecycle_order, test_time_curve
from lmforge.eval.svg import PALETTE, Series, line_chart, stacked_area_chart
from lmforge.train.metrics import smooth

HELDOUT_PREFIXES = ("val_", "heldout_")
VAL_LOSS_VIEWS = ("val_loss", "val_bpb", "val_bits_per_byte", "val_perplexity")  # on the loss chart already
FEW_MEASUREMENTS = 8  # a held-out metric measured this many times or fewer is drawn as points, not a curve


def loss_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Train-row keys worth a curve: loss first, then other losses/rewards/margins that a stage logs.
    Counters (tokens seen, tokens per source, loss tokens per batch), throughput, held-out metrics (drawn as
    points, `heldout_keys`) and standard errors (drawn as bars) are left out: a cumulative count is a straight
    line that says nothing about the run."""
    keys = {k for r in rows for k, v in r.items() if finite(v)}
    skip = {"step", "lr", "tokens_seen", "tokens_per_s", "grad_norm", "seconds", "elapsed", "loss_tokens"}
    main = [k for k in ("loss", "val_loss") if k in keys]
    return main + sorted(k for k in keys - skip - set(main)
                         if not k.startswith(("tokens.", "n_", *HELDOUT_PREFIXES))
                         and not k.endswith(("_tokens", "_count", "_stderr")))


def heldout_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Held-out metrics a stage logs at its evaluations (`val_*` other than the loss, `heldout_*`)."""
    keys = {k for r in rows for k, v in r.items() if finite(v)}
    return sorted(k for k in keys if k.startswith(HELDOUT_PREFIXES) and k not in VAL_LOSS_VIEWS
                  and not k.endswith("_stderr"))


Errors = list[float | None] | None


def with_errors(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float], Errors]:
    """(steps, values, standard errors) of `key`: the error of each measurement that logged its `key_stderr`
    (None for the others), or None when none did."""
    pts = [(r["step"], r[key], r.get(key + "_stderr")) for r in rows if finite(r.get(key))]
    errs = [p[2] if finite(p[2]) else None for p in pts]
    return [p[0] for p in pts], [p[1] for p in pts], errs if any(e is not None for e in errs) else None


def mixture_shares(rows: list[dict[str, Any]]) -> tuple[list[float], dict[str, list[float]]]:
    """The share of each source in the tokens trained on between consecutive metrics rows, from the cumulative
    `tokens.<source>` counts pretraining logs: (the step ending each interval, {source: shares})."""
    logged = [r for r in rows if any(k.startswith("tokens.") for k in r)]
    sources = sorted({k[len("tokens."):] for r in logged for k in r if k.startswith("tokens.") and finite(r[k])})
    steps: list[float] = []
    shares: dict[str, list[float]] = {s: [] for s in sources}
    previous = dict.fromkeys(sources, 0.0)
    for r in logged:
        now = {s: float(r[f"tokens.{s}"]) if finite(r.get(f"tokens.{s}")) else previous[s] for s in sources}
        delta = {s: now[s] - previous[s] for s in sources}
        total = sum(delta.values())
        previous = now
        if total <= 0 or any(d < 0 for d in delta.values()):  # a repeated row, or counts that went back
            continue
        steps.append(r["step"])
        for s in sources:
            shares[s].append(delta[s] / total)
    return steps, shares


def mixture_text(rows: list[dict[str, Any]]) -> str:
    """`mixture: a 80.0%, b 20.0%`: each source's share of all the tokens trained on ("" for one source)."""
    last = next((r for r in reversed(rows) if any(k.startswith("tokens.") for k in r)), {})
    counts = {k[len("tokens."):]: v for k, v in last.items() if k.startswith("tokens.") and finite(v)}
    total = sum(counts.values())
    if len(counts) < 2 or total <= 0:
        return ""
    return "mixture: " + ", ".join(f"{name} {100 * v / total:.1f}%" for name, v in counts.items())


def says_something(series: list[Series]) -> bool:
    """A chart is worth drawing when some series in it takes at least two distinct values."""
    return any(len(set(s.ys)) >= 2 for s in series)


def stage_charts(label: str, rows: list[dict[str, Any]], with_lr: bool = True,
                 result: dict[str, Any] | None = None) -> list[str]:
    """The small multiples of one stage: loss (train and validation on one chart), learning rate (when
    `with_lr`), the mixture's share per source, the other curves it logs, and its held-out metrics (points with
    standard-error bars when measured a few times, from step 0 where the stage's `result` has the value measured
    before training, `<key>_before`); only charts with at least two distinct values."""
    candidates: list[tuple[str, list[Series], str]] = []
    xs, ys = column(rows, "loss")
    vx, vy, verr = with_errors(rows, "val_loss")
    series = []
    if xs:
        window = 2 * (len(ys) // 40) + 1
        series += [Series("train loss", xs, ys, PALETTE[0], 1, 0.35),
                   Series("train loss (smoothed)", xs, smooth(ys, window), PALETTE[0], 2)]
    if vx:
        series.append(Series("val loss", vx, vy, PALETTE[1], 2, markers=True, errs=verr))
    candidates.append((f"{label}: loss", series, "nats/token"))
    if with_lr:
        lx, ly = column(rows, "lr")
        candidates.append((f"{label}: learning rate", [Series("lr", lx, ly, PALETTE[2], 2)], "lr"))
    others = [k for k in loss_keys(rows) if k not in ("loss", "val_loss")]
    for i, key in enumerate(others[:6]):
        kx, ky = column(rows, key)
        candidates.append((f"{label}: {key}", [Series(key, kx, ky, PALETTE[(3 + i) % len(PALETTE)], 2,
                                                      markers=len(kx) <= 5)], ""))
    for i, key in enumerate(heldout_keys(rows)[:6]):
        hx, hy, herr = with_errors(rows, key)
        before, before_err = (result or {}).get(f"{key}_before"), (result or {}).get(f"{key}_stderr_before")
        if finite(before) and 0 not in hx:
            hx, hy = [0, *hx], [before, *hy]
            errs = [before_err if finite(before_err) else None, *(herr or [None] * (len(hx) - 1))]
            herr = errs if any(e is not None for e in errs) else None
        few = len(hx) <= FEW_MEASUREMENTS
        candidates.append((f"{label}: {key}", [Series(key, hx, hy, PALETTE[(5 + i) % len(PALETTE)], 2,
                                                      markers=True, errs=herr, line=not few)], "held-out"))
    charts = [line_chart(ss, title, ylabel=unit, width=420, height=240)
              for title, ss, unit in candidates if says_something(ss)]
    steps, shares = mixture_shares(rows)
    if says_something([Series(s, steps, v) for s, v in shares.items()]) and len(shares) > 1:
        charts.insert(1, stacked_area_chart(steps, shares, f"{label}: mixture share per source", width=420,
                                            height=240))
    return charts


def test_time_chart(label: str, curve: dict[str, list[dict[str, float]]]) -> str:
    """Accuracy against generated tokens per problem (log scale), one line per method, standard-error bars."""
    series = [Series(method, [p["tokens"] for p in ps], [p["accuracy"] for p in ps], PALETTE[i % len(PALETTE)], 2,
                     markers=True, errs=[p["stderr"] if finite(p.get("stderr")) else 0.0 for p in ps])
              for i, (method, ps) in enumerate(curve.items())]
    if not says_something(series) and len({x for s in series for x in s.xs}) < 2:
        return ""
    return line_chart(series, f"{label}: test-time compute", xlabel="generated tokens per problem",
                      ylabel="accuracy", width=420, height=240, log_x=True)


def charts_html(run: RunData) -> str:
    """Every stage's charts in lifecycle order in one grid; the learning rate drawn once (the first stage that has
    a schedule worth drawing), since each stage's warmup-and-decay looks the same."""
    charts: list[str] = []
    lr_drawn = False
    for label in lifecycle_order(list(dict.fromkeys([*run.metrics, *run.stages]))):
        rows = run.metrics.get(label, [])
        has_lr = says_something([Series("lr", *column(rows, "lr"))])
        charts += stage_charts(label, rows, has_lr and not lr_drawn, run.stages.get(label)) if rows else []
        lr_drawn = lr_drawn or has_lr
        curve = test_time_curve(run.stages.get(label, {}))
        if curve and (chart := test_time_chart(label, curve)):
            charts.append(chart)
    return f'<div class="charts">{"".join(charts)}</div>' if charts else ""
