"""Toxicity filter beyond a keyword list: a hashed n-gram logistic regression (the quality classifier's model,
`classifier.HashedLogReg`) trained on labelled examples by `lmforge data train-classifier`. It sees word pairs,
so "kill the process" and "I will kill you" score apart where a keyword list cannot tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.core.config import option, require
from lmforge.data.filters.classifier import HashedLogReg
from lmforge.data.readers import Document
from lmforge.data.steps import Step


@dataclass
class ToxicityFilter(Step):
    """Reject documents the classifier scores p(toxic) >= `threshold`; the score goes to metadata["toxicity"]."""

    name = "toxicity"
    model: str = option("", help="a classifier trained by `lmforge data train-classifier` (.safetensors)")
    threshold: float = option(0.5, help="lowest p(toxic) to reject")
    _clf: HashedLogReg | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        require(bool(self.model), "toxicity.model", self.model, "a classifier file (lmforge data train-classifier)")
        require(0.0 < self.threshold <= 1.0, "toxicity.threshold", self.threshold, "in (0, 1]")
        self._clf = HashedLogReg.load(self.model)  # a missing or bad file fails when the recipe is read

    def __call__(self, doc: Document) -> str | None:
        assert self._clf is not None
        score = self._clf.score(doc.text)
        doc.metadata["toxicity"] = round(score, 4)
        return "toxic" if score >= self.threshold else None
