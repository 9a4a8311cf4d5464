"""Quality classifier: logistic regression on hashed word n-grams, trained to tell a "good" sample
(reference text) from a "random" sample (the raw corpus) - the GPT-3 / LLaMA recipe (Brown et al.
2020, Appendix A; Touvron et al. 2023) with the feature hashing trick (Weinberger et al. 2009).

Features: word 1- and 2-grams hashed into `dim` buckets, log(1 + count), L2-normalized per document.
Training is full-batch gradient descent on the L2-regularized log loss, vectorized over a CSR matrix
(np.add.reduceat for the logits, np.bincount for the gradient).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.core.config import option, require
from lmforge.core.errors import LmforgeError
from lmforge.data.dedup.decontaminate import word_hashes
from lmforge.data.filters.text import ngram_hashes
from lmforge.data.readers import Document, read_documents
from lmforge.data.steps import Step


def features(text: str, dim: int, ngrams: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices, values) of one document."""
    ids = word_hashes(text)
    hashes = np.concatenate([ngram_hashes(ids, n) for n in range(1, ngrams + 1)]) if len(ids) else ids
    buckets, counts = np.unique((hashes % np.uint64(dim)).astype(np.int64), return_counts=True)
    values = np.log1p(counts.astype(np.float64))
    norm = np.linalg.norm(values)
    return buckets, values / norm if norm else values


class HashedLogReg:
    """p(good | text) = sigmoid(w . phi(text) + b)."""

    def __init__(self, dim: int = 2**18, ngrams: int = 2) -> None:
        self.dim, self.ngrams = dim, ngrams
        self.w = np.zeros(dim)
        self.b = 0.0

    def fit(self, good: Iterable[str], other: Iterable[str], steps: int = 300, lr: float = 2.0,
            l2: float = 1e-4) -> HashedLogReg:
        rows = [features(t, self.dim, self.ngrams) for t in good]
        n_good = len(rows)
        rows += [features(t, self.dim, self.ngrams) for t in other]
        if n_good == 0 or n_good == len(rows):
            raise LmforgeError("classifier training needs documents in both the good and the random sample")
        y = np.r_[np.ones(n_good), np.zeros(len(rows) - n_good)]
        lengths = np.array([len(r[0]) for r in rows])
        keep = lengths > 0
        indices = np.concatenate([r[0] for r in rows])
        values = np.concatenate([r[1] for r in rows])
        starts = np.r_[0, np.cumsum(lengths)[:-1]]
        row_of = np.repeat(np.arange(len(rows)), lengths)
        for _ in range(steps):
            p = self._sigmoid(self._logits(indices, values, starts, keep) + self.b)
            err = (p - y) / len(rows)
            grad = np.bincount(indices, weights=values * err[row_of], minlength=self.dim)
            self.w -= lr * (grad + l2 * self.w)
            self.b -= lr * err.sum()
        return self

    def _logits(self, indices: np.ndarray, values: np.ndarray, starts: np.ndarray, keep: np.ndarray) -> np.ndarray:
        out = np.zeros(len(starts))
        if keep.any():
            sums = np.add.reduceat(self.w[indices] * values, starts[keep])
            out[keep] = sums
        return out

    @staticmethod
    def _sigmoid(z: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))

    def score(self, text: str) -> float:
        idx, val = features(text, self.dim, self.ngrams)
        return float(self._sigmoid(np.array([self.w[idx] @ val + self.b]))[0])

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, w=self.w, b=self.b, dim=self.dim, ngrams=self.ngrams)

    @classmethod
    def load(cls, path: str | Path) -> HashedLogReg:
        try:
            data = np.load(path)
        except (OSError, ValueError) as e:
            raise LmforgeError(f"{path}: not a classifier file ({e})") from None
        model = cls(int(data["dim"]), int(data["ngrams"]))
        model.w, model.b = data["w"], float(data["b"])
        return model


@dataclass
class ClassifierFilter(Step):
    """Keep documents the classifier scores at least `threshold`; the score goes to metadata."""

    name = "classifier"
    model: str = option("", help="a saved classifier (.npz); trained and saved here when good/random are given")
    good: list[str] = option(default_factory=list, help="files of high-quality reference text")
    random: list[str] = option(default_factory=list, help="files sampled from the raw corpus")
    threshold: float = option(0.5, help="lowest p(good) to keep")
    dim: int = option(2**18, help="hashed feature buckets")
    _clf: HashedLogReg | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        require(bool(self.model or (self.good and self.random)), "classifier.model", self.model,
                "a trained classifier, or classifier.good and classifier.random given to train one")

    def classifier(self) -> HashedLogReg:
        if self._clf is None:
            if self.good and self.random:
                self._clf = HashedLogReg(self.dim).fit((d.text for d in read_documents(self.good)),
                                                       (d.text for d in read_documents(self.random)))
                if self.model:
                    self._clf.save(self.model)
            else:
                self._clf = HashedLogReg.load(self.model)
        return self._clf

    def __call__(self, doc: Document) -> str | None:
        score = self.classifier().score(doc.text)
        doc.metadata["quality_score"] = round(score, 4)
        return "low_quality_score" if score < self.threshold else None
