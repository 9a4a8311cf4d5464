"""Benchmark decontamination: drop training documents sharing any word n-gram with evaluation data
(n = 13 as in GPT-3, Brown et al. 2020, Appendix C)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from lmforge.core.config import option, require
from lmforge.data.filters.text import ngram_hashes
from lmforge.data.readers import Document, iter_input_files, open_binary
from lmforge.data.steps import Step

_WORD_RE = re.compile(r"[^\W_]+")


def word_hashes(text: str) -> np.ndarray:
    toks = _WORD_RE.findall(text.lower())
    table = {w: xxhash.xxh64_intdigest(w.encode()) for w in set(toks)}
    return np.fromiter((table[w] for w in toks), dtype=np.uint64, count=len(toks))


def eval_texts(path: Path):
    """Texts of an evaluation file: every string value of each JSONL record (question, choices, answer...),
    or the whole file for anything else."""
    name = path.name.removesuffix(".gz").removesuffix(".zst")
    with open_binary(path) as f:
        data = f.read().decode("utf-8", "replace")
    if not name.endswith((".jsonl", ".json")):
        yield data
        return
    for line in data.splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                yield line
                continue
            yield " ".join(_strings(record))


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


@dataclass
class Decontaminate(Step):
    """Reject documents containing any `n`-word sequence of the evaluation files."""

    name = "decontaminate"
    eval_files: list[str] = option(default_factory=list, help="evaluation files or folders (JSONL or text)")
    n: int = option(13, help="words per n-gram")
    _grams: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        require(bool(self.eval_files), "decontaminate.eval_files", self.eval_files,
                "a non-empty list of evaluation files or folders")

    def grams(self) -> np.ndarray:
        if self._grams is None:
            parts = [ngram_hashes(word_hashes(t), self.n) for p in iter_input_files(self.eval_files)
                     for t in eval_texts(p)]
            self._grams = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
        return self._grams

    def __call__(self, doc: Document) -> str | None:
        grams = self.grams()
        hashes = ngram_hashes(word_hashes(doc.text), self.n)
        if len(hashes) and len(grams):
            pos = np.searchsorted(grams, hashes).clip(max=len(grams) - 1)
            hits = int((grams[pos] == hashes).sum())
            if hits:
                doc.metadata["contaminated_ngrams"] = hits
                return "contaminated"
        return None
