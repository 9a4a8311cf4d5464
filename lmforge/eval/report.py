"""`lmforge report RUN_DIR`: one self-contained HTML page about a run, readable offline.

The run directory is searched (a few levels deep, skipping checkpoints and TensorBoard folders)
for what the stages leave behind, so the same command works on a single `lmforge pretrain` run
and on a quickstart run with one subfolder per stage:

- `metrics.jsonl` (any stage that trained) -> loss, validation loss and learning-rate curves (inline SVG)
- `config.json` / `*_config.json` of runs (not of model or tokenizer folders) -> the configuration
- `stats.json` (data pipeline) and shard `index.json` files -> data statistics
- `summary.json` (quickstart) -> stage timings, results and samples before/after
- JSON files with a "tasks" mapping -> the evaluation table (one column per file) and decontamination
"""

from __future__ import annotations

import datetime
import html
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_text
from lmforge.eval.svg import PALETTE, Series, line_chart, stacked_area_chart
from lmforge.eval.tasks import load_task
from lmforge.train.metrics import read_metrics, smooth

SKIP_DIRS = {"checkpoints", "tb", "__pycache__", ".git"}
MAX_JSON_BYTES = 20_000_000
MAX_DEPTH = 4
TASK_METRICS = ("acc", "acc_norm", "exact_match", "f1", "win_rate", "reward_accuracy")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em;white-space:pre-wrap}
.muted{color:#777}.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:.8em}
.charts svg{width:100%;height:auto}.chart text{font-size:11px;fill:#333}
.chart .title{font-size:13px;font-weight:600}.chart .grid{stroke:#eee}.chart .frame{fill:none;stroke:#999}
.card{border:1px solid #ccc;border-radius:8px;padding:.6em 1.2em;background:#fafbfc}.card h1{margin-top:.2em}
.card td.change{font-variant-numeric:tabular-nums}
.up{color:#1a7f37}.down{color:#cf222e}td.sample{font-family:ui-monospace,monospace;white-space:pre-wrap;
font-size:.85em;max-width:500px}
"""


@dataclass
class RunData:
    root: Path
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    decontam: dict[str, dict[str, Any]] = field(default_factory=dict)
    kinds: dict[str, dict[str, list[str | None]]] = field(default_factory=dict)  # eval -> task -> kind per example
    answers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # eval -> the first generated answers
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.root.resolve().name


def _walk(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and depth < MAX_DEPTH)
        files += [Path(dirpath) / f for f in sorted(filenames)]
    return files


def _load_json(path: Path) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _is_model_dir(directory: Path) -> bool:
    return any((directory / f).is_file() for f in ("model.safetensors", "adapter_model.safetensors",
                                                   "adapter_config.json", "tokenizer.json"))


def _task_kind(data: Any) -> str | None:
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict) or not tasks or not all(isinstance(t, dict) for t in tasks.values()):
        return None
    first = next(iter(tasks.values()))
    if "contaminated" in first:
        return "decontam"
    if any(m in first for m in TASK_METRICS):
        return "eval"
    return None


def collect_run(run_dir: str | Path) -> RunData:
    """Everything a report shows, found under `run_dir`."""

    root = Path(run_dir)
    if not root.is_dir():
        raise LmforgeError(f"run directory not found: {root}")
    run = RunData(root)
    curves: dict[str, dict[str, Any]] = {}
    for path in _walk(root):
        rel = path.relative_to(root)
        label = str(rel.parent) if str(rel.parent) != "." else "run"
        if path.name == "metrics.jsonl":
            rows = read_metrics(path)
            if rows:
                run.metrics[label] = rows
            continue
        if path.suffix != ".json":
            continue
        if path.name in ("config.json", "quickstart_config.json") or (
                path.name.endswith("_config.json") and path.name not in ("tokenizer_config.json",
                                                                         "adapter_config.json")):
            if not _is_model_dir(path.parent):
                data = _load_json(path)
                if isinstance(data, dict):
                    run.configs[str(rel)] = data
            continue
        data = _load_json(path)
        if not isinstance(data, dict):
            continue
        if path.name == "stats.json":
            run.stats[label] = data
        elif path.name == "index.json" and "n_tokens" in data:
            run.stats[label] = {k: data[k] for k in ("n_tokens", "n_docs", "n_bytes", "vocab_size") if k in data}
        elif path.name == "summary.json" and rel.parent == Path(".") and isinstance(data.get("stages"), dict):
            run.summary = data
        elif path.name == "done.json":
            run.stages[label] = data
        elif isinstance(data.get("test_time_curve"), list):  # a reasoning run's results, outside a quickstart
            curves[label] = data
        elif (kind := _task_kind(data)) == "eval":
            run.evals[str(rel.with_suffix(""))] = data
            run.kinds[str(rel.with_suffix(""))] = example_kinds(path, data)
            run.answers[str(rel.with_suffix(""))] = example_answers(path, data)
        elif kind == "decontam":
            run.decontam[str(rel.with_suffix(""))] = data
    if run.summary is not None:
        run.stages = {k: v for k, v in run.summary["stages"].items() if isinstance(v, dict)}
    for label, data in curves.items():
        run.stages.setdefault(label, data)
    if not (run.metrics or run.configs or run.summary or run.evals or run.stats):
        raise LmforgeError(f"{root}: nothing to report (no metrics.jsonl, config, summary.json, stats or eval "
                           "results found)")
    return run


def _task_examples(path: Path, result: dict[str, Any]) -> list[Any]:
    """The examples of the task a result scored: from the task YAML's path, or a `tasks/` folder beside the
    results when the run directory moved; [] when neither loads."""
    if not isinstance(result.get("path"), str):
        return []
    for task_file in (Path(result["path"]), path.parent / "tasks" / Path(result["path"]).name):
        try:
            return load_task(task_file).examples
        except LmforgeError:
            continue
    return []


def example_kinds(path: Path, record: dict[str, Any]) -> dict[str, list[str | None]]:
    """Per task, the `kind` of each scored example (copy, reverse, ...): from the example itself, else from the
    row of the task's data it was made from. Tasks whose data has no kinds are left out."""
    out: dict[str, list[str | None]] = {}
    for name, result in record["tasks"].items():
        examples = result.get("examples")
        if not isinstance(examples, list) or not examples:
            continue
        kinds = [e.get("kind") if isinstance(e, dict) else None for e in examples]
        if not any(kinds):
            rows = [ex.fields for ex in _task_examples(path, result)]
            kinds = [rows[e["index"]].get("kind") if isinstance(e, dict) and isinstance(e.get("index"), int)
                     and 0 <= e["index"] < len(rows) else None for e in examples]
        if any(kinds):
            out[name] = kinds
    return out


def example_answers(path: Path, record: dict[str, Any], limit: int = 5) -> list[dict[str, Any]]:
    """The first `limit` answers a model generated for a generate task of an eval results file:
    [{"task", "index", "prompt", "answer", "output"}], the prompt from the task's data."""
    out = []
    for name, result in record["tasks"].items():
        examples = [e for e in result.get("examples") or () if isinstance(e, dict) and isinstance(e.get("output"), str)
                    and isinstance(e.get("index"), int)]
        if not examples:
            continue
        task = {ex.index: ex for ex in _task_examples(path, result)}
        for e in examples[:limit]:
            ex = task.get(e["index"])
            answers = e.get("answers") or (ex.answers if ex else [])
            out.append({"task": name, "index": e["index"], "prompt": ex.fields.get("prompt", ex.prompt) if ex else "",
                        "answer": answers[0] if answers else "", "output": e["output"]})
        break  # one task's prompts are enough to compare the stages
    return out


# ------------------------------------------------------------------------------------------------
# pieces of HTML


def esc(value: Any) -> str:
    return html.escape(str(value))


def fmt_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    return str(v)


def table(header: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    """An HTML table; numbers right-aligned. `raw` cells are inserted unescaped (already HTML)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{v if raw and isinstance(v, str) else esc(fmt_value(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def flatten(data: dict[str, Any], prefix: str = "", depth: int = 2) -> dict[str, Any]:
    """Scalar leaves of a nested dict as dotted keys (lists and deep values left out)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 0:
            out.update(flatten(v, key + ".", depth - 1))
        elif isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 120) or v is None:
            out[key] = v
    return out


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def column(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if finite(r.get(key))]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


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


def test_time_curve(result: dict[str, Any]) -> dict[str, list[dict[str, float]]]:
    """A stage result's `test_time_curve` ([{"method", "tokens", "accuracy", "stderr", "n"}, ...]) as
    {method: points by tokens}; malformed points are left out."""
    curve: dict[str, list[dict[str, float]]] = {}
    points = result.get("test_time_curve")
    for p in points if isinstance(points, list) else ():
        if isinstance(p, dict) and isinstance(p.get("method"), str) and finite(p.get("tokens")) \
                and finite(p.get("accuracy")):
            curve.setdefault(p["method"], []).append(p)
    return {m: sorted(ps, key=lambda p: p["tokens"]) for m, ps in curve.items()}


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


def val_rows(run: RunData) -> list[list[Any]]:
    """Last validation metrics of each trained stage: stage | metric | first | last | best."""
    rows = []
    for label in lifecycle_order(list(run.metrics)):
        metrics = run.metrics[label]
        keys = sorted({k for r in metrics for k in r if k.startswith("val_") and finite(r[k])})
        for key in keys:
            _, ys = column(metrics, key)
            best = min(ys) if "loss" in key or "bpb" in key else max(ys)
            rows.append([label, key, ys[0], ys[-1], best, len(ys)])
    return rows


def eval_table(evals: dict[str, dict[str, Any]]) -> str:
    """Rows task/metric, one column per results file: stages side by side show what each one changed."""
    labels = lifecycle_order(list(evals))
    keys: list[tuple[str, str]] = []
    for record in evals.values():
        for task, r in record["tasks"].items():
            keys += [(task, m) for m in TASK_METRICS if m in r and (task, m) not in keys]
    rows = []
    for task, m in keys:
        cells: list[Any] = [task, m]
        n = None
        for label in labels:
            r = evals[label]["tasks"].get(task, {})
            n = n or r.get("n")
            cells.append(f"{r[m]:.3f} ± {r.get(m + '_stderr', 0):.3f}" if finite(r.get(m)) else "")
        rows.append([*cells[:2], n or "", *cells[2:]])
    extra = []
    for label, record in evals.items():
        for key in ("loss", "perplexity", "bits_per_byte"):
            if finite(record.get(key)):
                extra.append([label, key, record[key]])
    html_rows = table(["task", "metric", "n", *labels], rows)
    return html_rows + (table(["results", "metric", "value"], extra) if extra else "")


def kind_table(run: RunData) -> str:
    """Each task's headline metric per kind of example, one column per results file: a flat average can hide a
    stage that helps one kind and hurts another."""
    labels = lifecycle_order(list(run.evals))
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    counts: dict[tuple[str, str, str], int] = {}
    for label in labels:
        for task, kinds in run.kinds.get(label, {}).items():
            result = run.evals[label]["tasks"][task]
            metric = next((m for m in TASK_METRICS if m in result), None)
            if metric is None:
                continue
            by_kind: dict[str, list[float]] = {}
            for kind, ex in zip(kinds, result["examples"]):
                if kind is not None and finite(ex.get(metric)):
                    by_kind.setdefault(kind, []).append(float(ex[metric]))
            for kind, values in sorted(by_kind.items()):
                err = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
                cells.setdefault((task, kind, metric), {})[label] = f"{statistics.fmean(values):.3f} ± {err:.3f}"
                counts[(task, kind, metric)] = len(values)
    rows = [[task, kind, metric, counts[(task, kind, metric)], *(by.get(label, "") for label in labels)]
            for (task, kind, metric), by in cells.items()]
    return table(["task", "kind", "metric", "n", *labels], rows) if rows else ""


def decontam_table(reports: dict[str, dict[str, Any]]) -> str:
    rows = []
    for label, rep in reports.items():
        for task, t in rep["tasks"].items():
            rows.append([label, task, rep.get("n", ""), t["examples"], t["too_short"], t["contaminated"],
                         f"{100 * t.get('contaminated_fraction', 0):.1f}%"])
    return table(["report", "task", "n-gram", "examples", "too short (unchecked)", "contaminated", "of checked"], rows)


def samples_html(stages: dict[str, dict[str, Any]]) -> str:
    """Every `samples_*` list of strings in the stage results, side by side per prompt."""
    out = []
    for stage in lifecycle_order(list(stages)):
        result = stages[stage]
        lists = {k: v for k, v in result.items()
                 if k.startswith("samples") and isinstance(v, list) and all(isinstance(s, str) for s in v)}
        if not lists:
            continue
        names = list(lists)
        n = max(len(v) for v in lists.values())
        rows = [[f'<td class="sample">{esc(lists[k][i]) if i < len(lists[k]) else ""}</td>' for k in names]
                for i in range(n)]
        head = "".join(f"<th>{esc(k.replace('_', ' '))}</th>" for k in names)
        body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
        out.append(f"<h3>{esc(stage)}</h3><table><tr>{head}</tr>{body}</table>")
    return "".join(out)


def chat_samples(run: RunData) -> tuple[list[str], list[dict[str, Any]]]:
    """The chat model's answers to the same held-out prompts at each stage (base, after SFT, after DPO/RL):
    (stage labels in lifecycle order, [{"prompt", "answer", label: output, ...}]). From the eval stage's
    `models.<label>.samples` of a quickstart, else from the eval results files' generated answers."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    models = (run.stages.get("eval") or {}).get("models")
    for label, scores in (models or {}).items():
        samples = scores.get("samples") if isinstance(scores, dict) else None
        if isinstance(samples, list):
            by_label[label] = [x for x in samples if isinstance(x, dict) and isinstance(x.get("prompt"), str)]
    if not by_label:
        by_label = {label.split("/")[-1]: answers for label, answers in run.answers.items() if answers}
    labels = lifecycle_order([k for k, v in by_label.items() if v])
    if len(labels) < 2:  # one model's answers are no comparison (the eval table has its score)
        return [], []
    rows: dict[str, dict[str, Any]] = {}
    for label in labels:
        for x in by_label[label]:
            row = rows.setdefault(x["prompt"], {"prompt": x["prompt"], "answer": x.get("answer", "")})
            row[label] = x.get("output", "")
    return labels, [r for r in rows.values() if sum(label in r for label in labels) >= 2]


def chat_samples_html(run: RunData) -> str:
    """One table, a row per held-out prompt and a column per stage: what each stage changed in the answers."""
    labels, rows = chat_samples(run)
    if not rows:
        return ""
    head = "".join(f"<th>{esc(h)}</th>" for h in ("prompt", "expected", *labels))
    body = "".join("<tr>" + "".join(f'<td class="sample">{esc(r.get(k, ""))}</td>'
                                    for k in ("prompt", "answer", *labels)) + "</tr>" for r in rows)
    return f'<table id="side-by-side"><tr>{head}</tr>{body}</table>'


def stage_results_table(stages: dict[str, dict[str, Any]]) -> str:
    """Every scalar a stage returned, in lifecycle order, folded under a <details>; values a stage did not
    measure (None) are left out."""
    rows = []
    for stage in lifecycle_order(list(stages)):
        flat = flatten({k: v for k, v in stages[stage].items() if not k.startswith("samples")})
        for key, value in flat.items():
            if value is not None and key != "sha256" and not key.endswith(".sha256"):
                rows.append([stage, key, value])
    return (f"<details><summary>all stage results ({len(rows)} values)</summary>"
            f"{table(['stage', 'result', 'value'], rows)}</details>")


# ------------------------------------------------------------------------------------------------
# the lifecycle card: one row per stage, in the order a run goes through them

LIFECYCLE = ("corpus", "clean", "tokenizer", "shards", "pretrain", "sft", "dpo", "preference", "reward", "ppo",
             "grpo", "rl", "reasoning", "eval")


def lifecycle_order(names: list[str]) -> list[str]:
    """Stage names in lifecycle order (corpus -> ... -> eval); unknown names keep their place after the known."""
    rank = {name: i for i, name in enumerate(("base", *LIFECYCLE))}

    def key(name: str) -> tuple[int, int]:
        parts = name.split("/")  # a stage folder (`sft`), or an eval file of a stage's model (`eval/sft`)
        return min(rank.get(p, len(rank)) for p in (parts[0], parts[-1])), names.index(name)
    return sorted(names, key=key)


def _arrow(before: Any, after: Any, fmt: str = ".3f") -> str:
    return f"{before:{fmt}} -> {after:{fmt}}" if finite(before) and finite(after) else ""


def _scored(r: dict[str, Any], metric: str) -> str:
    value, err = r.get(metric), r.get(metric + "_stderr")
    if not finite(value):
        return ""
    return f"{value:.3f} ± {err:.3f}" if finite(err) else f"{value:.3f}"


def _before_after(r: dict[str, Any], key: str) -> str:
    """`before ± se -> after ± se` of a held-out figure a stage measured before and after training."""
    before = {"value": r.get(f"{key}_before"), "value_stderr": r.get(f"{key}_stderr_before")}
    after = {"value": r.get(key), "value_stderr": r.get(f"{key}_stderr")}
    return " -> ".join(x for x in (_scored(before, "value"), _scored(after, "value")) if x)


def _curve_point(p: dict[str, Any]) -> str:
    err = f" ± {p['stderr']:.3f}" if finite(p.get("stderr")) else ""
    return f"{p['accuracy']:.3f}{err} at {p['tokens']:,.0f} tokens"


def _eval_lines(models: dict[str, Any]) -> list[str]:
    """`task metric: base x ± se -> sft y ± se -> ...` for the headline metric of each task."""
    lines = []
    tasks = {t: r for m in models.values() if isinstance(m, dict) for t, r in m.items() if isinstance(r, dict)}
    for task, first in tasks.items():
        metric = next((m for m in ("exact_match", "acc_norm", "acc", "f1") if m in first), None)
        if metric is None:
            continue
        shown = [f"{label} {_scored(m.get(task, {}), metric)}" for label, m in models.items()
                 if isinstance(m, dict) and _scored(m.get(task, {}), metric)]
        if shown:
            lines.append(f"{task} {metric}: " + " -> ".join(shown))
    return lines


def stage_headline(stage: str, r: dict[str, Any]) -> tuple[str, str]:
    """(what the stage made, what it changed) for one stage's result, as plain text."""
    kind = stage.split("/")[0]
    if kind == "corpus":
        return f"{fmt_value(r.get('docs'))} docs, {r.get('bytes', 0) / 1e6:.2f} MB", ""
    if kind == "clean":
        kept = f"kept {fmt_value(r.get('docs_kept'))} of {fmt_value(r.get('docs_in'))} docs"
        return ", ".join(r.get("steps", [])), kept
    if kind == "tokenizer":
        return f"vocab {fmt_value(r.get('vocab_size'))}", ""
    if kind == "shards":
        return f"{fmt_value(r.get('train_tokens'))} train / {fmt_value(r.get('val_tokens'))} val tokens", ""
    if kind == "pretrain":
        b, a = r.get("val_before") or {}, r.get("val_after") or {}
        change = "; ".join(x for x in (f"val loss {_arrow(b.get('loss'), a.get('loss'))}" if a else "",
                                       f"bits/byte {_arrow(b.get('bits_per_byte'), a.get('bits_per_byte'))}"
                                       if finite(a.get("bits_per_byte")) else "") if x)
        return f"{fmt_value(r.get('steps'))} steps, {fmt_value(round(r.get('tokens_per_s') or 0))} tokens/s", change
    if kind == "eval":
        return "", "; ".join(_eval_lines(r.get("models") or {}))
    curve = test_time_curve(r)
    if curve:  # each method at its least and its most test-time compute
        return "", "; ".join(f"{method} " + " -> ".join(map(_curve_point, ps[:1] + ps[1:][-1:]))
                             for method, ps in curve.items())
    made = f"{fmt_value(r.get('steps'))} steps" if "steps" in r else ""
    if finite(r.get("train_conversations")):
        made += f" on {fmt_value(r['train_conversations'])} conversations"
    changes = [f"{name} {_before_after(r, key)}" for key, name in (("heldout_logp_margin", "preference margin"),
                                                                   ("heldout_preference_accuracy",
                                                                    "preference accuracy")) if finite(r.get(key))]
    if finite(r.get("val_loss")):
        changes.append(f"val loss {_arrow(r.get('base_val_loss'), r['val_loss']) or fmt_value(r['val_loss'])}")
    if not changes and finite(r.get("final_loss")):
        changes.append(f"final train loss {r['final_loss']:.3f}")
    return made, "; ".join(changes)


Figure = tuple[float, float | None]  # a value and its standard error (None when not measured)


def headline_figures(stage: str, r: dict[str, Any]) -> dict[str, Figure]:
    """The numbers behind a stage's card row, after the stage ran (what `lmforge compare` puts side by side)."""
    kind = stage.split("/")[0]
    keys = {"corpus": (("docs", "docs"), ("bytes", "bytes")), "clean": (("docs_kept", "docs kept"),),
            "tokenizer": (("vocab_size", "vocab"),),
            "shards": (("train_tokens", "train tokens"), ("val_tokens", "val tokens")),
            "pretrain": (("steps", "steps"), ("tokens_per_s", "tokens/s")),
            }.get(kind, (("steps", "steps"), ("heldout_logp_margin", "preference margin"),
                         ("heldout_preference_accuracy", "preference accuracy"), ("val_loss", "val loss")))
    out: dict[str, Figure] = {name: (r[k], r[f"{k}_stderr"] if finite(r.get(f"{k}_stderr")) else None)
                              for k, name in keys if finite(r.get(k))}
    after = r.get("val_after") if kind == "pretrain" else None
    if isinstance(after, dict):
        out.update({name: (after[k], None) for k, name in (("loss", "val loss"), ("bits_per_byte", "bits/byte"))
                    if finite(after.get(k))})
    if kind == "eval":
        for label, tasks in (r.get("models") or {}).items():
            for task, t in (tasks.items() if isinstance(tasks, dict) else ()):
                metric = next((m for m in ("exact_match", "acc_norm", "acc", "f1") if isinstance(t, dict)
                               and finite(t.get(m))), None)
                if metric:
                    err = t.get(metric + "_stderr")
                    out[f"{task} {metric} ({label})"] = (t[metric], err if finite(err) else None)
    for method, ps in test_time_curve(r).items():
        p = ps[-1]
        out[f"{method} accuracy (most compute)"] = (p["accuracy"], p["stderr"] if finite(p.get("stderr")) else None)
    if finite(r.get("seconds")):
        out["seconds"] = (r["seconds"], None)
    return out


def card_figures(run: RunData) -> dict[tuple[str, str], Figure]:
    """{(stage, figure): value} of every stage in lifecycle order; a run without stage results (a single
    `lmforge pretrain`) gives its last train and validation loss."""
    out: dict[tuple[str, str], Figure] = {}
    for stage in lifecycle_order(list(run.stages)):
        out.update({(stage, name): v for name, v in headline_figures(stage, run.stages[stage]).items()})
    if not run.stages:
        for label, metrics in run.metrics.items():
            for key, name in (("loss", "last train loss"), ("val_loss", "val loss")):
                _, ys = column(metrics, key)
                if ys:
                    out[(label, name)] = (ys[-1], None)
    if run.summary and finite(run.summary.get("seconds")):
        out[("total", "seconds")] = (run.summary["seconds"], None)
    return out


def machine_text(machine: dict[str, Any] | None, precision: str | None = None) -> str:
    """CPU, threads, GPU, SIMD flags and precision in one line ("" when nothing was recorded)."""
    m = machine or {}
    parts = [f"{k} {fmt_value(m[k])}" for k in ("cpu", "threads", "gpu") if m.get(k)]
    if m.get("cpu_flags"):
        parts.append("CPU flags " + " ".join(m["cpu_flags"]))
    if precision:
        parts.append(f"precision {precision}")
    return ", ".join(parts)


def _machine_line(machine: dict[str, Any] | None, precision: str | None) -> str:
    text = machine_text(machine, precision)
    return f'<p class="muted">machine: {esc(text)}</p>' if text else ""


def lifecycle_card(run: RunData, title: str) -> str:
    """The first thing on the page: every stage in lifecycle order with its headline figures and wall time."""
    rows = []
    for stage in lifecycle_order(list(run.stages)):
        made, change = stage_headline(stage, run.stages[stage])
        made = "\n".join(x for x in (made, mixture_text(run.metrics.get(stage, []))) if x)
        seconds = run.stages[stage].get("seconds")
        rows.append([stage, made, change.replace("; ", "\n"), seconds if finite(seconds) else ""])
    if not rows:  # a single training run: its curves' first and last validation values
        for label, metrics in run.metrics.items():
            _, ys = column(metrics, "val_loss")
            _, ts = column(metrics, "loss")
            rows.append([label, f"{len(ts)} logged steps", f"val loss {_arrow(ys[0], ys[-1])}" if ys else
                         (f"train loss {_arrow(ts[0], ts[-1])}" if ts else ""), ""])
    total = run.summary.get("seconds") if run.summary else None
    head = f"<h1>{esc(title)}</h1>"
    if finite(total):
        head += f"<p>Finished in <b>{fmt_value(total)} s</b> ({len(run.stages)} stages).</p>"
    body = table(["stage", "made", "change", "seconds"], rows).replace("\n", "<br>") if rows else ""
    precision = next((c.get("train", {}).get("precision") for n, c in run.configs.items()
                      if n.startswith("pretrain") and isinstance(c.get("train"), dict)), None)
    machine = run.summary.get("machine") if run.summary else None
    return f'<section class="card" id="card">{head}{body}{_machine_line(machine, precision)}</section>'


def page(title: str, body: list[str], card: str = "") -> str:
    """The HTML page; `card` (which holds the title) comes first in the body when given."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = card or f"<h1>{esc(title)}</h1>"
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>{head}"
            f"<p class=\"muted\">generated by lmforge on {stamp}</p>{''.join(body)}</body></html>\n")


def render_report(run: RunData) -> str:
    body = []
    charts = charts_html(run)
    if charts:
        body.append("<h2>Training curves</h2>" + charts)
    if run.metrics:
        vr = val_rows(run)
        if vr:
            body.append("<h2>Validation metrics</h2>" + table(["stage", "metric", "first", "last", "best", "evals"],
                                                             vr))
    if run.evals:
        body.append("<h2>Evaluation</h2>" + eval_table(run.evals))
        kinds = kind_table(run)
        if kinds:
            body.append("<h3>By kind of example</h3>" + kinds)
    if run.decontam:
        body.append("<h2>Decontamination</h2>" + decontam_table(run.decontam))
    side_by_side = chat_samples_html(run)
    if side_by_side:
        body.append("<h2>Answers side by side</h2><p class=\"muted\">the same held-out prompts, answered by the "
                    "model after each stage</p>" + side_by_side)
    samples = samples_html(run.stages)
    if samples:
        body.append("<h2>Samples</h2>" + samples)
    if run.stages:
        body.append("<h2>Stage results</h2>" + stage_results_table(run.stages))
    if run.stats:
        body.append("<h2>Data</h2>")
        for label, stats in run.stats.items():
            body.append(f"<h3>{esc(label)}</h3>" + table(["statistic", "value"], list(map(list, flatten(stats,
                                                                                                      depth=3).items()))))
    if run.configs:
        body.append("<h2>Configuration</h2>")
        body += [f"<details><summary>{esc(name)}</summary><pre>{esc(json.dumps(cfg, indent=2))}</pre></details>"
                 for name, cfg in run.configs.items()]
    title = f"lmforge run report: {run.name}"
    return page(title, body, lifecycle_card(run, title))


@dataclass
class ReportConfig:
    run_dir: str = option(help="a run directory (pretrain run, or a quickstart run with stage folders)",
                          positional=True)
    output: str = option("", "HTML file to write; default RUN_DIR/report.html")


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    run = collect_run(run_dir)
    out = Path(output) if output else Path(run_dir) / "report.html"
    atomic_write_text(out, render_report(run))
    return out


def report_cmd(cfg: ReportConfig) -> int:
    out = write_report(cfg.run_dir, cfg.output or None)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB; open it in a browser, it needs no network)")
    return 0
