"""Perplexity filter scored by a small word n-gram model trained on a reference corpus (CCNet, Wenzek et
al. 2020, used a KenLM model of Wikipedia the same way: text unlike the reference scores high).

The model is interpolated maximum likelihood (Jelinek & Mercer 1980):
    P(w | h_k) = lambda * c(h_k, w) / c(h_k) + (1 - lambda) * P(w | h_{k-1}),
down to an add-one unigram. Counts live in sorted arrays of 64-bit n-gram hashes, so scoring a
document is a few `np.searchsorted` calls, not a Python loop over its words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lmforge.core.config import option, require
from lmforge.data.dedup.decontaminate import word_hashes
from lmforge.data.filters.text import ngram_hashes
from lmforge.data.readers import Document, read_documents
from lmforge.data.steps import Step


class NGramModel:
    """Counts of 1..order-grams (hashed) from training texts; `log_probs(text)` per word."""

    def __init__(self, texts, order: int = 3, interpolation: float = 0.6) -> None:
        self.order, self.lam = order, interpolation
        grams: list[list[np.ndarray]] = [[] for _ in range(order)]
        for text in texts:
            ids = word_hashes(text)
            for k in range(order):
                grams[k].append(ngram_hashes(ids, k + 1))
        self.tables = []
        for k in range(order):
            arr = np.concatenate(grams[k]) if grams[k] else np.zeros(0, np.uint64)
            keys, counts = np.unique(arr, return_counts=True)
            self.tables.append((keys, counts.astype(np.float64)))
        self.n_tokens = float(self.tables[0][1].sum())
        self.vocab = float(len(self.tables[0][0]))

    @staticmethod
    def _lookup(table: tuple[np.ndarray, np.ndarray], hashes: np.ndarray) -> np.ndarray:
        keys, counts = table
        if len(keys) == 0:
            return np.zeros(len(hashes))
        pos = np.searchsorted(keys, hashes).clip(max=len(keys) - 1)
        return np.where(keys[pos] == hashes, counts[pos], 0.0)

    def log_probs(self, text: str) -> np.ndarray:
        ids = word_hashes(text)
        if len(ids) == 0:
            return np.zeros(0)
        p = (self._lookup(self.tables[0], ids) + 1.0) / (self.n_tokens + self.vocab + 1.0)
        for k in range(2, self.order + 1):
            if len(ids) < k:
                break
            full = self._lookup(self.tables[k - 1], ngram_hashes(ids, k))
            context = self._lookup(self.tables[k - 2], ngram_hashes(ids[:-1], k - 1))
            ml = np.divide(full, context, out=np.zeros_like(full), where=context > 0)
            p[k - 1:] = self.lam * ml + (1 - self.lam) * p[k - 1:]
        return np.log(p)

    def perplexity(self, text: str) -> float:
        lp = self.log_probs(text)
        return math.exp(-lp.mean()) if len(lp) else math.inf


@dataclass
class PerplexityFilter(Step):
    """Reject documents whose perplexity under the reference n-gram model exceeds `max_perplexity`."""

    name = "perplexity"
    reference: list[str] = option(default_factory=list, help="reference corpus files/folders (text or JSONL)")
    order: int = option(3, help="n-gram order")
    max_perplexity: float = option(1000.0, help="reject above this perplexity")
    _model: NGramModel | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        require(bool(self.reference), "perplexity.reference", self.reference,
                "a non-empty list of files to train the n-gram model on")

    def model(self) -> NGramModel:
        if self._model is None:
            self._model = NGramModel((d.text for d in read_documents(self.reference)), self.order)
        return self._model

    def __call__(self, doc: Document) -> str | None:
        ppl = self.model().perplexity(doc.text)
        doc.metadata["perplexity"] = round(ppl, 2) if math.isfinite(ppl) else None
        return "high_perplexity" if ppl > self.max_perplexity else None
