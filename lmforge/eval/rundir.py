"""A run directory, read: what the stages of a run left behind, found a few levels deep (checkpoints and
TensorBoard folders skipped), so `lmforge report` and `lmforge compare` work on a single `lmforge pretrain`
run and on a quickstart run with one subfolder per stage:

- `metrics.jsonl` (any stage that trained) -> the curves
- `config.json` / `*_config.json` of runs (not of model or tokenizer folders) -> the configuration
- `stats.json` (data pipeline) and shard `index.json` files -> data statistics
- `summary.json` (quickstart) or each stage's `done.json` -> stage results, timings and samples
- JSON files with a "tasks" mapping -> evaluation results (with the kind of each example and the first
  generated answers) and decontamination reports
- a JSON with a `test_time_curve` list -> a reasoning stage's results
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.core.errors import LmforgeError
from lmforge.eval.tasks import load_task
from lmforge.train.metrics import read_metrics

SKIP_DIRS = {"checkpoints", "tb", "__pycache__", ".git"}
MAX_JSON_BYTES = 20_000_000
MAX_DEPTH = 4
TASK_METRICS = ("acc", "acc_norm", "exact_match", "f1", "win_rate", "reward_accuracy")


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
    if not (run.metrics or run.configs or run.summary or run.evals or run.stats or run.stages):
        raise LmforgeError(f"{root}: nothing to report (no metrics.jsonl, config, summary.json, stats, eval or search "
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


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def column(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if finite(r.get(key))]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


LIFECYCLE = ("corpus", "clean", "tokenizer", "shards", "pretrain", "sft", "dpo", "preference", "reward", "ppo",
             "grpo", "rl", "reasoning", "eval")


def lifecycle_order(names: list[str]) -> list[str]:
    """Stage names in lifecycle order (corpus -> ... -> eval); unknown names keep their place after the known."""
    rank = {name: i for i, name in enumerate(("base", *LIFECYCLE))}

    def key(name: str) -> tuple[int, int]:
        parts = name.split("/")  # a stage folder (`sft`), or an eval file of a stage's model (`eval/sft`)
        return min(rank.get(p, len(rank)) for p in (parts[0], parts[-1])), names.index(name)
    return sorted(names, key=key)


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
