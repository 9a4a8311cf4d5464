"""Language identification with py3langid (Lui & Baldwin 2012, langid.py; its model ships in the wheel).

The identifier is pluggable: any `callable(text) -> (lang, score)` passed as `identify` replaces it
(e.g. a fastText lid.176 wrapper where that model is available). FineWeb keeps English pages scoring
at least 0.65; that is the default here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError
from lmforge.data.readers import Document
from lmforge.data.steps import Step


@lru_cache(maxsize=1)
def langid_identifier() -> Callable[[str], tuple[str, float]]:
    try:
        from py3langid import langid
    except ImportError:
        raise LmforgeError("the language step needs py3langid (pip install py3langid)") from None
    model = Path(langid.__file__).parent / langid.MODEL_FILE
    return langid.LanguageIdentifier.from_modelpath(model, norm_probs=True).classify


@dataclass
class LanguageFilter(Step):
    """Keep documents in `languages` with score >= `min_score`; the label goes to metadata."""

    name = "language"
    languages: list[str] = option(default_factory=lambda: ["en"], help="ISO 639-1 codes to keep (empty: any)")
    min_score: float = option(0.65, help="lowest identifier confidence to keep")
    max_chars: int = option(10_000, help="classify only the first this many characters (speed)")
    identify: Callable[[str], tuple[str, float]] | None = field(default=None, repr=False)

    def __call__(self, doc: Document) -> str | None:
        identify = self.identify or langid_identifier()
        lang, score = identify(doc.text[: self.max_chars].replace("\n", " "))
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(float(score), 4)
        if self.languages and lang not in self.languages:
            return f"language_{lang}"
        if score < self.min_score:
            return "language_low_score"
        return None
