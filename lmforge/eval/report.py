"""`lmforge report RUN_DIR`: one self-contained HTML page about a run, readable offline, top down as a report
card: the lifecycle card (`card.py`), the charts (`charts.py`), validation metrics, evaluation per task and per
kind of example, decontamination, the chat model's answers side by side across stages, samples, every stage
result folded away, data statistics and the configuration. What it shows is found by `rundir.collect_run`.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.core.config import option
from lmforge.core.files import atomic_write_text
from lmforge.eval.card import lifecycle_card
from lmforge.eval.charts import charts_html
from lmforge.eval.page import esc, flatten, page, table
from lmforge.eval.rundir import TASK_METRICS, RunData, collect_run, column, finite, lifecycle_order


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
