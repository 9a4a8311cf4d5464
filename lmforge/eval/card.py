"""The lifecycle card, the first thing on a report: one row per stage in the order a run goes through them,
with what it made, what it changed, its wall time, and the machine; and the figures behind each row, which
`lmforge compare` puts side by side."""

from __future__ import annotations

from typing import Any

from lmforge.eval.charts import mixture_text
from lmforge.eval.page import esc, fmt_value, table
from lmforge.eval.rundir import RunData, column, finite, lifecycle_order, test_time_curve


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
    if kind == "eval":  # task by task, each model in turn
        models = {label: m for label, m in (r.get("models") or {}).items() if isinstance(m, dict)}
        for task in dict.fromkeys(t for m in models.values() for t, v in m.items() if isinstance(v, dict)):
            for label, m in models.items():
                t = m.get(task) or {}
                metric = next((x for x in ("exact_match", "acc_norm", "acc", "f1") if finite(t.get(x))), None)
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
