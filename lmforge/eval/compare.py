"""`lmforge compare RUN_A RUN_B`: two runs' curves overlaid and their metrics side by side, in one HTML page.

Stages are matched by name (`pretrain` with `pretrain`, ...); two single-stage runs are matched
whatever their stage folders are called. Run A is drawn solid, run B dashed, one color per curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.core.config import option
from lmforge.core.files import atomic_write_text
from lmforge.eval.card import Figure, card_figures, machine_text
from lmforge.eval.charts import says_something
from lmforge.eval.page import esc, page, table
from lmforge.eval.rundir import TASK_METRICS, RunData, collect_run, column, finite, lifecycle_order
from lmforge.eval.svg import PALETTE, Series, line_chart


def stage_pairs(a: RunData, b: RunData) -> list[tuple[str, str, str]]:
    """(title, stage in A, stage in B) for the stages both runs trained."""
    common = [s for s in lifecycle_order(list(a.metrics)) if s in b.metrics]
    if common:
        return [(s, s, s) for s in common]
    if len(a.metrics) == 1 and len(b.metrics) == 1:
        sa, sb = next(iter(a.metrics)), next(iter(b.metrics))
        return [(sa if sa == sb else f"{sa} / {sb}", sa, sb)]
    return []


def overlay_charts(a: RunData, b: RunData, sa: str, sb: str, title: str) -> str:
    names = (f"A {a.name}", f"B {b.name}")
    charts = []
    for key, ylabel in (("loss", "nats/token"), ("val_loss", "nats/token"), ("lr", "lr")):
        series = []
        for i, (run, stage) in enumerate(((a, sa), (b, sb))):
            xs, ys = column(run.metrics[stage], key)
            if xs:
                series.append(Series(f"{names[i]}: {key}", xs, ys, PALETTE[i], 2, dashed=i == 1,
                                     markers=key == "val_loss"))
        if says_something(series):  # a single validation, a constant learning rate: no chart
            charts.append(line_chart(series, f"{title}: {key}", ylabel=ylabel))
    return f'<div class="charts">{"".join(charts)}</div>'


def final_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Last train loss, last/best validation values, steps, throughput of one stage's metrics."""
    out: dict[str, float] = {}
    _, loss = column(rows, "loss")
    if loss:
        out["last train loss"] = loss[-1]
    for key in sorted({k for r in rows for k in r if k.startswith("val_") and finite(r[k])}):
        _, ys = column(rows, key)
        out[f"last {key}"] = ys[-1]
        out[f"best {key}"] = min(ys) if ("loss" in key or "bpb" in key) else max(ys)
    out["steps"] = max(r["step"] for r in rows)
    _, tps = column(rows, "tokens_per_s")
    if tps:
        out["tokens/s (median)"] = sorted(tps)[len(tps) // 2]
    return out


NEUTRAL = ("steps", "docs", "bytes", "vocab", "docs kept", "train tokens", "val tokens", "tokens/s",
           "tokens/s (median)")  # more or less of these is neither better nor worse


def direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is, 0 when neither."""
    if metric in NEUTRAL:
        return 0
    return -1 if any(w in metric for w in ("loss", "bpb", "perplexity", "bits", "seconds")) else 1


def delta_text(va: Any, vb: Any, ea: Any = None, eb: Any = None, decimals: int = 3) -> str:
    """B - A, with the standard error of the difference when both values have one."""
    if not (finite(va) and finite(vb)):
        return ""
    err = f" ± {math.hypot(ea, eb):.3f}" if finite(ea) and finite(eb) else ""
    return ("0" if vb == va else number_text(vb - va, "+", decimals)) + err


def delta_cell(metric: str, va: Any, vb: Any, ea: Any = None, eb: Any = None) -> str:
    text = delta_text(va, vb, ea, eb, decimals_of(metric))
    if not text:
        return ""
    d = (vb - va) * direction(metric)
    cls = "" if d == 0 else (' class="up"' if d > 0 else ' class="down"')
    return f"<span{cls}>{esc(text)}</span>"


def decimals_of(figure: str) -> int:
    return 1 if figure == "seconds" else 3


def figure_text(value: Figure | None, figure: str = "") -> str:
    if value is None:
        return ""
    v, err = value
    return number_text(v, "", decimals_of(figure)) + (f" ± {err:.3f}" if finite(err) else "")


def number_text(v: float, sign: str = "", decimals: int = 3) -> str:
    """Counts with thousands separators; other figures (losses, accuracies) to 3 decimals, seconds to 1."""
    if isinstance(v, int) or abs(v) >= 1000:
        return f"{v:{sign},.0f}"
    return f"{v:{sign}.{decimals}f}"


def card_rows(a: RunData, b: RunData) -> list[tuple[str, str, Figure | None, Figure | None]]:
    """(stage, figure, A, B) for every headline figure of either run, in lifecycle order (the total last)."""
    fa, fb = card_figures(a), card_figures(b)
    keys = list(dict.fromkeys([*fa, *fb]))
    order = {s: i for i, s in enumerate(lifecycle_order(list(dict.fromkeys(k[0] for k in keys if k[0] != "total"))))}
    keys.sort(key=lambda k: order.get(k[0], len(order)))  # stable: figures keep their order within a stage
    return [(stage, name, fa.get((stage, name)), fb.get((stage, name))) for stage, name in keys]


def _parts(value: Figure | None) -> Figure | tuple[None, None]:
    return value if value is not None else (None, None)


def compare_card(a: RunData, b: RunData, title: str) -> str:
    """The lifecycle card of both runs: a row per stage figure, a column per run, and B - A."""
    rows = []
    for stage, name, fa, fb in card_rows(a, b):
        (va, ea), (vb, eb) = _parts(fa), _parts(fb)
        rows.append([esc(stage), esc(name), esc(figure_text(fa, name)), esc(figure_text(fb, name)),
                     delta_cell(name, va, vb, ea, eb)])
    machines = "".join(f'<p class="muted">machine of {tag}: {esc(machine_text(run.summary.get("machine")))}</p>'
                       for tag, run in (("A", a), ("B", b)) if run.summary and run.summary.get("machine"))
    return (f'<section class="card" id="card"><h1>{esc(title)}</h1>'
            + table(["stage", "figure", f"A {a.name}", f"B {b.name}", "B - A"], rows, raw=True)
            + machines + "</section>")


def card_text(a: RunData, b: RunData) -> str:
    """The compare card as a terminal table."""
    rows = [("stage", "figure", f"A {a.name}", f"B {b.name}", "B - A")]
    for stage, name, fa, fb in card_rows(a, b):
        (va, ea), (vb, eb) = _parts(fa), _parts(fb)
        rows.append((stage, name, figure_text(fa, name), figure_text(fb, name),
                     delta_text(va, vb, ea, eb, decimals_of(name))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def eval_pairs(a: RunData, b: RunData) -> list[list[Any]]:
    """task / metric rows of the last eval results file of each run."""
    if not a.evals or not b.evals:
        return []
    ra, rb = a.evals[sorted(a.evals)[-1]]["tasks"], b.evals[sorted(b.evals)[-1]]["tasks"]
    rows = []
    for task in [t for t in ra if t in rb]:
        for m in TASK_METRICS:
            va, vb = ra[task].get(m), rb[task].get(m)
            if finite(va) and finite(vb):
                rows.append([esc(task), esc(m), f"{va:.4f}", f"{vb:.4f}", delta_cell(m, va, vb)])
    return rows


def render_compare(a: RunData, b: RunData) -> str:
    runs = [["A (solid)", a.name, str(a.root)], ["B (dashed)", b.name, str(b.root)]]
    body = ["<h2>Runs</h2>" + table(["", "run", "directory"], runs)]
    pairs = stage_pairs(a, b)
    if not pairs:
        body.append("<p class=\"muted\">No stage trained in both runs: nothing to overlay.</p>")
    for title, sa, sb in pairs:
        body.append(f"<h2>Curves: {esc(title)}</h2>" + overlay_charts(a, b, sa, sb, title))
        fa, fb = final_metrics(a.metrics[sa]), final_metrics(b.metrics[sb])
        rows = [[esc(k), esc(f"{fa[k]:.4g}") if k in fa else "", esc(f"{fb[k]:.4g}") if k in fb else "",
                 delta_cell(k, fa.get(k), fb.get(k))] for k in dict.fromkeys([*fa, *fb])]
        body.append(table(["metric", "A", "B", "B - A"], rows, raw=True))
    evals = eval_pairs(a, b)
    if evals:
        body.append("<h2>Evaluation</h2>" + table(["task", "metric", "A", "B", "B - A"], evals, raw=True))
    if a.summary and b.summary:
        rows = [[esc(s), a.stages.get(s, {}).get("seconds", ""), b.stages.get(s, {}).get("seconds", "")]
                for s in dict.fromkeys([*a.stages, *b.stages])]
        body.append("<h2>Stage seconds</h2>" + table(["stage", "A", "B"], rows, raw=True))
    title = f"lmforge compare: {a.name} vs {b.name}"
    return page(title, body, compare_card(a, b, title))


@dataclass
class CompareConfig:
    run_a: str = option(help="first run directory (drawn solid)", positional=True)
    run_b: str = option(help="second run directory (drawn dashed)", positional=True)
    output: str = option("compare.html", "HTML file to write")


def write_compare(run_a: str | Path, run_b: str | Path, output: str | Path) -> tuple[Path, str]:
    """Write the compare page to `output`; returns its path and the card as a terminal table."""
    a, b = collect_run(run_a), collect_run(run_b)
    atomic_write_text(output, render_compare(a, b))
    return Path(output), card_text(a, b)


def compare_cmd(cfg: CompareConfig) -> int:
    out, card = write_compare(cfg.run_a, cfg.run_b, cfg.output)
    print(card)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0
