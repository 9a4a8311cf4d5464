"""Corpus-level repetition: boilerplate lines that recur across many documents (dolma/RefinedWeb-style
line dedup), and C4's three-sentence-span dedup (Raffel et al. 2020, Sec. 2.2: "we discarded all but
one of any three-sentence span occurring more than once in the data set")."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from lmforge.core.config import option
from lmforge.data.readers import Document
from lmforge.data.steps import Barrier

_SENTENCE_RE = re.compile(r"[^.!?\n]*(?:[.!?]+[\"')\]]*|\n|$)")


def _h(text: str) -> int:
    return xxhash.xxh64_intdigest(text.encode("utf-8", "surrogatepass"))


@dataclass
class LineDedup(Barrier):
    """Remove lines found in at least `min_docs` documents; reject a document left with too little text."""

    name = "line_dedup"
    modifies = True
    min_docs: int = option(5, help="a line in this many documents is boilerplate")
    min_line_chars: int = option(10, help="shorter lines are never removed (blank lines, short headings)")
    min_doc_chars: int = option(1, help="reject a document left with fewer characters")

    def key(self, doc: Document) -> np.ndarray:
        return np.unique(np.array([_h(line.strip()) for line in doc.text.splitlines()
                                   if len(line.strip()) >= self.min_line_chars], dtype=np.uint64))

    def resolve(self, keys: Sequence[list[Any]], ids: Sequence[list[str]]) -> list[Any]:
        flat = [k for shard in keys for k in shard]
        if not flat:
            return [frozenset()] * len(keys)
        values, counts = np.unique(np.concatenate(flat), return_counts=True)  # each doc counts a line once
        repeated = frozenset(values[counts >= self.min_docs].tolist())
        return [repeated] * len(keys)

    def apply(self, doc: Document, index: int, plan: frozenset) -> str | None:
        if not plan:
            return None
        lines = doc.text.splitlines(keepends=True)
        kept = [line for line in lines if len(line.strip()) < self.min_line_chars or _h(line.strip()) not in plan]
        if len(kept) < len(lines):
            doc.text = "".join(kept).strip("\n")
            doc.metadata["repeated_lines_removed"] = len(lines) - len(kept)
        return "only_repeated_lines" if len(doc.text.strip()) < self.min_doc_chars else None


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character ranges of sentences (terminal punctuation or line ends), non-blank ones only."""
    return [m.span() for m in _SENTENCE_RE.finditer(text) if m.group(0).strip()]


@dataclass
class SpanDedup(Barrier):
    """C4 span dedup: every 3-sentence window seen earlier in the corpus is cut from later documents."""

    name = "c4_span_dedup"
    modifies = True
    n_sentences: int = option(3, help="sentences per span")
    min_doc_words: int = option(50, help="reject a document left with fewer words")

    def _span_hashes(self, text: str) -> tuple[list[tuple[int, int]], list[int]]:
        spans = sentence_spans(text)
        n = self.n_sentences
        norm = [" ".join(text[a:b].split()).lower() for a, b in spans]
        return spans, [_h("\x1f".join(norm[i:i + n])) for i in range(len(spans) - n + 1)]

    def key(self, doc: Document) -> list[int]:
        return self._span_hashes(doc.text)[1]

    def resolve(self, keys: Sequence[list[Any]], ids: Sequence[list[str]]) -> list[Any]:
        owner: dict[int, tuple[int, int]] = {}
        counts: Counter = Counter()
        for s, shard in enumerate(keys):
            for d, hashes in enumerate(shard):
                for h in set(hashes):
                    counts[h] += 1
                    owner.setdefault(h, (s, d))
        duplicated = {h: o for h, o in owner.items() if counts[h] > 1}
        return [(s, duplicated) for s in range(len(keys))]

    def apply(self, doc: Document, index: int, plan: tuple[int, dict[int, tuple[int, int]]]) -> str | None:
        shard, duplicated = plan
        if not duplicated:
            return None
        spans, hashes = self._span_hashes(doc.text)
        drop = np.zeros(len(spans), dtype=bool)
        for i, h in enumerate(hashes):
            if h in duplicated and duplicated[h] != (shard, index):
                drop[i:i + self.n_sentences] = True
        if not drop.any():
            return None
        doc.text = "".join(doc.text[a:b] for (a, b), d in zip(spans, drop) if not d).strip()
        doc.metadata["duplicate_sentences_removed"] = int(drop.sum())
        return "too_short_after_span_dedup" if len(doc.text.split()) < self.min_doc_words else None
