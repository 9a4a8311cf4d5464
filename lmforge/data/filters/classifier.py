"""Quality classifier: logistic regression on hashed word n-grams, trained to tell a "good" sample
(reference text) from a "random" sample (the raw corpus) - the GPT-3 / LLaMA recipe (Brown et al.
2020, Appendix A; Touvron et al. 2023) with the feature hashing trick (Weinberger et al. 2009).

Features: word 1- and 2-grams hashed into `dim` buckets, log(1 + count), L2-normalized per document.
Training is full-batch gradient descent on the L2-regularized log loss, vectorized over a CSR matrix
(np.add.reduceat for the logits, np.bincount for the gradient).

The same model, trained from labelled examples by `lmforge data train-classifier`, backs the `toxicity` step.
A model is a safetensors file (weights `w`, `b`; `dim` and `ngrams` in its metadata): no pickle, nothing in
it runs. Older `.npz` models are still read, with numpy's pickle loading off.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.core.config import option, require
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write, atomic_write_json
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
        """A safetensors file, written atomically."""
        from safetensors.numpy import save

        data = save({"w": self.w.astype(np.float32), "b": np.array([self.b], dtype=np.float32)},
                    metadata={"format": "lmforge-hashed-logreg", "dim": str(self.dim), "ngrams": str(self.ngrams)})

        def write(tmp: str) -> None:
            Path(tmp).write_bytes(data)

        atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: str | Path) -> HashedLogReg:
        """Read a model saved by `save` (or an older .npz, pickle refused); a bad file is one LmforgeError."""
        path = Path(path)
        if not path.is_file():
            raise LmforgeError(f"{path}: no such classifier file")
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    dim, ngrams, w, b = int(data["dim"]), int(data["ngrams"]), data["w"], float(data["b"])
            else:
                from safetensors import safe_open

                with safe_open(str(path), framework="numpy") as f:
                    meta = f.metadata() or {}
                    dim, ngrams = int(meta["dim"]), int(meta["ngrams"])
                    w, b = f.get_tensor("w").astype(np.float64), float(f.get_tensor("b")[0])
        except Exception as e:  # safetensors raises its own error types; numpy OSError/ValueError/KeyError
            raise LmforgeError(f"{path}: not a classifier file ({type(e).__name__}: {e})") from None
        if w.shape != (dim,):
            raise LmforgeError(f"{path}: weights of shape {w.shape}, expected ({dim},)")
        model = cls(dim, ngrams)
        model.w, model.b = w, b
        return model


@dataclass
class ClassifierFilter(Step):
    """Keep documents the classifier scores at least `threshold`; the score goes to metadata."""

    name = "classifier"
    model: str = option("", help="a saved classifier (.safetensors); trained and saved here when good/random "
                                 "are given")
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


# ----------------------------------------------------------------------------------------------
# `lmforge data train-classifier`: a classifier from labelled examples, measured on held-out labels


def labelled_examples(inputs: list[str], label_field: str, positive: str) -> tuple[list[str], list[bool]]:
    """(texts, is_positive) of every record; a record without the label field is an error naming file:line."""
    texts, labels = [], []
    for doc in read_documents(inputs):
        if label_field not in doc.metadata:
            raise LmforgeError(f"{doc.source}: no '{label_field}' field (the label)")
        value = doc.metadata[label_field]
        value = int(value) if isinstance(value, bool) else value
        texts.append(doc.text)
        labels.append(str(value) == positive)
    return texts, labels


def held_out_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a seeded permutation, `fraction` of it held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = int(round(n * fraction))
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def precision_recall(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = scores >= threshold
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    return {"precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(tp + fn, 1), 4),
            "accuracy": round(float((predicted == labels).mean()) if len(labels) else 0.0, 4),
            "positives": int(labels.sum()), "negatives": int((~labels).sum())}


@dataclass
class TrainClassifierConfig:
    input: list[str] = option(default_factory=list, help="labelled JSONL/Parquet files or folders")
    output: str = option("classifier.safetensors", help="the model (safetensors); metrics go beside it as .json")
    label_field: str = option("label", help="field holding each example's label")
    positive: str = option("1", help="label value of the positive class (e.g. toxic); every other value is negative")
    held_out: float = option(0.2, help="fraction of the examples kept out of training to measure precision/recall")
    threshold: float = option(0.5, help="p(positive) at which an example counts as positive when measuring")
    seed: int = option(0, help="seed of the held-out split")
    dim: int = option(2**18, help="hashed feature buckets")
    steps: int = option(300, help="gradient steps")


def train_classifier(cfg: TrainClassifierConfig) -> dict[str, float]:
    """Train on the labelled examples less a held-out fraction, measure precision/recall on that fraction, save
    the model and `<output>.json` (the metrics); returns the metrics."""
    require(bool(cfg.input), "input", cfg.input, "at least one labelled file")
    require(0.0 <= cfg.held_out < 1.0, "held_out", cfg.held_out, "in [0, 1)")
    texts, is_pos = labelled_examples(cfg.input, cfg.label_field, cfg.positive)
    labels = np.array(is_pos, dtype=bool)
    if labels.all() or not labels.any():
        raise LmforgeError(f"{', '.join(cfg.input)}: every example has the same label; need '{cfg.positive}' "
                           f"examples in field '{cfg.label_field}' and others")
    train, held = held_out_split(len(texts), cfg.held_out, cfg.seed)
    clf = HashedLogReg(cfg.dim).fit([texts[i] for i in train if labels[i]], [texts[i] for i in train if not labels[i]],
                                    steps=cfg.steps)
    metrics: dict[str, float] = {"train_examples": len(train), "held_out_examples": len(held),
                                 "threshold": cfg.threshold}
    if len(held):
        scores = np.array([clf.score(texts[i]) for i in held])
        metrics.update(precision_recall(scores, labels[held], cfg.threshold))
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    clf.save(output)
    atomic_write_json(output.with_suffix(".json"), {"label_field": cfg.label_field, "positive": cfg.positive,
                                                    "inputs": cfg.input, **metrics})
    return metrics


def train_classifier_cmd(cfg: TrainClassifierConfig) -> int:
    m = train_classifier(cfg)
    held = (f"; held-out ({m['held_out_examples']}): precision {m['precision']:.3f}, recall {m['recall']:.3f}, "
            f"accuracy {m['accuracy']:.3f}" if m["held_out_examples"] else "")
    print(f"trained on {m['train_examples']} examples{held}; model: {cfg.output}")
    return 0
