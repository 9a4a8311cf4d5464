"""Keyword / blocklist filter: reject documents containing listed words or phrases (whole words, any case).

C4 used the "List of Dirty, Naughty, Obscene or Otherwise Bad Words" this way; lists are given inline
or as a file, one entry per line, since none can be downloaded at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.core.config import option, require
from lmforge.data.readers import Document
from lmforge.data.steps import Step


@dataclass
class KeywordFilter(Step):
    """Reject a document holding at least `min_matches` blocklisted words or phrases."""

    name = "keyword"
    words: list[str] = option(default_factory=list, help="blocklisted words or phrases")
    file: str = option("", help="a file of blocklisted words, one per line (# comments allowed)")
    min_matches: int = option(1, help="matches needed to reject")
    _pattern: re.Pattern | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        entries = [w.strip().lower() for w in self.words if w.strip()]
        if self.file:
            path = Path(self.file)
            require(path.is_file(), "keyword.file", self.file, "an existing file")
            entries += [w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines()
                        if w.strip() and not w.startswith("#")]
        require(bool(entries), "keyword.words", self.words, "given, or keyword.file: the blocklist is empty")
        alternatives = "|".join(re.escape(w) for w in sorted(set(entries), key=len, reverse=True))
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def __call__(self, doc: Document) -> str | None:
        assert self._pattern is not None
        found = self._pattern.findall(doc.text, 0) if self.min_matches > 1 else [
            m.group(0) for m in [self._pattern.search(doc.text)] if m]
        if len(found) >= self.min_matches:
            return f"blocklist:{found[0].lower()}"
        return None
