"""Several models scored on the same held-out items: synthetic tasks (exact match) and, where the validation
text has prose, a corpus cloze (log-likelihood); the items are checked for overlap with the training data."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json
from lmforge.eval.decontam import find_contamination, task_texts
from lmforge.eval.harness import run_tasks, strip_examples
from lmforge.eval.make_tasks import make_cloze_task, make_synthetic_task, texts_from_source
from lmforge.eval.tasks import load_task
from lmforge.peft.config import load_trained
from lmforge.tokenizer import Tokenizer


def sample_answers(examples: list[Any], records: list[dict[str, Any]], n: int = 5) -> list[dict[str, Any]]:
    """A few generated answers for the report's side-by-side table: the first example of each kind of task
    (copy, reverse, ...), then the next ones, up to `n`; the same prompts for every model scored."""
    kinds: dict[Any, dict[str, Any]] = {}
    for r in records:
        kinds.setdefault(examples[r["index"]].fields.get("kind"), r)
    chosen = list(kinds.values())[:n]
    chosen += [r for r in records if r not in chosen][:n - len(chosen)]
    return [{"prompt": examples[r["index"]].fields["prompt"], "kind": examples[r["index"]].fields.get("kind"),
             "output": r["output"], "answer": r["answers"][0]} for r in sorted(chosen, key=lambda r: r["index"])]


def evaluate_models(out: Path, models: dict[str, tuple[str, str | None]], tokenizer_dir: Path, shards_dir: Path,
                    n_tasks: int, n_cloze: int, kinds: list[str]) -> dict[str, Any]:
    """Score each {label: (checkpoint, adapter)} on tasks built in OUT/tasks; OUT/<label>.json holds every
    example, OUT/decontam.json the overlap of the task texts with SHARDS_DIR/train.

    Returns {"models": {label: scores + a few sample answers, one per task kind}, "contaminated": {task: "K of N"},
    "notes": [...]}.
    """
    tasks = out / "tasks"
    synthetic = load_task(make_synthetic_task(tasks, n=n_tasks, kinds=kinds))
    notes = []
    try:  # held-out prose sentences; a small or code-only validation split may have none
        make_cloze_task(tasks, shards_dir / "val", tokenizer_dir=tokenizer_dir, n=n_cloze)
    except LmforgeError as e:
        notes.append(f"cloze task left out: {e}")
        print(f"note: {notes[-1]}", file=sys.stderr)
    tokenizer = Tokenizer.load(tokenizer_dir)
    scores: dict[str, Any] = {}
    for label, (checkpoint, adapter) in models.items():
        results = run_tasks(load_trained(checkpoint, adapter), tokenizer, [tasks], batch_size=32)
        atomic_write_json(out / f"{label}.json", {"checkpoint": checkpoint, "adapter": adapter, "tasks": results})
        scores[label] = strip_examples(results)
        scores[label]["samples"] = sample_answers(synthetic.examples, results["synthetic"]["examples"])
    contamination = find_contamination(task_texts([tasks]), texts_from_source(shards_dir / "train", tokenizer_dir))
    atomic_write_json(out / "decontam.json", contamination)
    contaminated = {task: f"{t['contaminated']} of {t['examples']}" for task, t in contamination["tasks"].items()}
    return {"models": scores, "contaminated": contaminated, "notes": notes}
