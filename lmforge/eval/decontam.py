"""N-gram decontamination: which task examples also occur in the training data.

As in GPT-3 (Brown et al., 2020, Appendix C) and lm-evaluation-harness, text is compared as
13-grams of normalized words (lower case, runs of letters and digits), so the check does not
depend on a tokenizer: an example is flagged when any of its n-grams occurs in the training text.
Examples shorter than n words are checked whole when they have at least `min_n` words.

Words and their n-grams are hashed to 64 bits exactly as the cleaning pipeline's `decontaminate` step
does (`lmforge.data.dedup.decontaminate.word_hashes`, `lmforge.data.filters.text.ngram_hashes`), so both
sides of the check are numpy arrays and a false match needs a hash collision.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json
from lmforge.data.dedup.decontaminate import word_hashes
from lmforge.data.filters.text import ngram_hashes
from lmforge.eval.harness import find_task_files
from lmforge.eval.make_tasks import texts_from_source
from lmforge.eval.tasks import load_task, target


@dataclass
class ExampleText:
    task: str
    index: int
    text: str


def task_texts(task_files: Sequence[str | Path]) -> list[ExampleText]:
    """Prompt + right answer of every example of the given tasks (files or directories)."""

    out = []
    for file in find_task_files(task_files):
        task = load_task(file)
        out += [ExampleText(task.name, ex.index, ex.prompt + task.spec.target_delimiter + target(task.spec, ex))
                for ex in task.examples]
    return out


def find_contamination(examples: Sequence[ExampleText], training_texts: Iterable[str], n: int = 13,
                       min_n: int = 8, chunk_words: int = 2_000_000, progress: bool = False) -> dict[str, Any]:
    """Count, per task, the examples sharing at least one word n-gram with the training texts.

    An example of L words, min_n <= L < n, is checked as one L-gram (its whole text), as GPT-3 did
    for short examples; shorter ones are counted as `too_short`.
    """
    if not 1 <= min_n <= n:
        raise LmforgeError(f"need 1 <= min_n <= n, got min_n={min_n}, n={n}")
    per_example = []  # (gram length, hashes) of each example
    for e in examples:
        ids = word_hashes(e.text)
        size = min(n, len(ids))
        per_example.append((size, ngram_hashes(ids, size) if size >= min_n else np.empty(0, np.uint64)))
    wanted = {size: np.unique(np.concatenate([h for s, h in per_example if s == size]))
              for size in {s for s, h in per_example if len(h)}}
    found: set[tuple[int, int]] = set()
    buffer: list[np.ndarray] = []
    n_words = buffered = 0

    def scan() -> None:
        ids = np.concatenate(buffer) if buffer else np.empty(0, np.uint64)
        for size, want in wanted.items():
            hashes = ngram_hashes(ids, size)
            found.update((size, int(h)) for h in np.unique(hashes[np.isin(hashes, want)]))

    for text in tqdm(training_texts, desc="decontam", unit="doc", disable=not progress):
        ids = word_hashes(text)
        n_words += len(ids)
        buffer.append(ids)
        buffered += len(ids)
        if buffered >= chunk_words:
            scan()
            joined = np.concatenate(buffer)
            tail = joined[len(joined) - (n - 1):] if n > 1 else joined[:0]
            buffer, buffered = [tail], len(tail)  # keep the n-grams that span two chunks
    scan()
    tasks: dict[str, dict[str, Any]] = {}
    for ex, (size, hashes) in zip(examples, per_example):
        t = tasks.setdefault(ex.task, {"examples": 0, "too_short": 0, "contaminated": 0, "flagged": []})
        t["examples"] += 1
        if len(hashes) == 0:
            t["too_short"] += 1
            continue
        hits = sum((size, int(h)) in found for h in hashes)
        if hits:
            t["contaminated"] += 1
            t["flagged"].append({"index": ex.index, "overlap": round(hits / len(hashes), 4),
                                 "text": ex.text[:200]})
    for t in tasks.values():
        checked = t["examples"] - t["too_short"]
        t["contaminated_fraction"] = t["contaminated"] / checked if checked else 0.0
    return {"n": n, "min_n": min_n, "training_words": n_words, "tasks": tasks}


@dataclass
class DecontamConfig:
    tasks: list[str] = option(default_factory=list, help="task YAML files or directories of them")
    train: list[str] = option(default_factory=list, help="training data: text/JSONL files or directories, "
                                                         "or token shard directories (with --tokenizer)")
    tokenizer: str = option("", "tokenizer directory, to decode token shards back to text")
    n: int = option(13, "n-gram length in words")
    min_n: int = option(8, "examples of min_n..n-1 words are checked whole; shorter ones are not checked")
    output: str = option("", "write the report JSON here (default: print only)")
    show: int = option(5, "flagged examples to print per task")


def decontam(cfg: DecontamConfig) -> dict[str, Any]:

    if not cfg.tasks or not cfg.train:
        raise LmforgeError("eval decontam: pass --tasks TASK_FILES_OR_DIRS and --train TRAINING_DATA")

    def training_texts() -> Iterable[str]:
        for source in cfg.train:
            yield from texts_from_source(source, cfg.tokenizer or None)

    report = find_contamination(task_texts(cfg.tasks), training_texts(), cfg.n, cfg.min_n, progress=True)
    report["train"] = list(cfg.train)
    if cfg.output:
        atomic_write_json(cfg.output, report)
    return report


def decontam_cmd(cfg: DecontamConfig) -> int:
    report = decontam(cfg)
    print(f"{report['n']}-gram overlap against {report['training_words']:,} training words")
    for name, t in report["tasks"].items():
        print(f"  {name}: {t['contaminated']} of {t['examples']} examples contaminated "
              f"({100 * t['contaminated_fraction']:.1f}% of checked; {t['too_short']} shorter than {report['min_n']} "
              "words, not checked)")
        for f in t["flagged"][:cfg.show]:
            print(f"    #{f['index']} overlap {f['overlap']:.0%}: {f['text'][:100]!r}")
    if cfg.output:
        print(f"report: {cfg.output}")
    return 0

