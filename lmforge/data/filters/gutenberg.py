"""Project Gutenberg books: keep the book, drop the licence boilerplate around it.

Every Gutenberg text wraps the book between a `*** START OF THE PROJECT GUTENBERG EBOOK <TITLE> ***` line
(after a header: title, author, release date, "This eBook is for the use of anyone anywhere...") and an
`*** END OF THE PROJECT GUTENBERG EBOOK <TITLE> ***` line (before the full Project Gutenberg License).
Older files say "THIS PROJECT GUTENBERG EBOOK" or "...ETEXT", and some end the small print with
`*END*THE SMALL PRINT!...*END*`. What is outside the markers goes, as do a "Produced by ..." credit
paragraph right after START and an "End of (the) Project Gutenberg ..." line right before END.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from lmforge.core.config import option
from lmforge.data.readers import Document
from lmforge.data.steps import Step

_START = re.compile(r"^\s*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)\b.*$|"
                    r"^\s*\*END\*THE SMALL PRINT!.*$", re.I | re.M)
_END = re.compile(r"^\s*\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)\b.*$", re.I | re.M)
_CREDIT = re.compile(r"\A\s*(?:Produced by|E-text prepared by|This (?:e-?book|etext) was produced by|"
                     r"Transcribed from)\b.*?(?:\n\s*\n|\Z)", re.I | re.S)
_END_LINE = re.compile(r"\n\s*End of (?:the )?Project Gutenberg(?:'s)?\b[^\n]*\s*\Z", re.I)


def strip_gutenberg(text: str) -> str | None:
    """The book between the START and END markers, or None when the text has no START marker."""
    starts = list(_START.finditer(text))
    if not starts:
        return None
    body = text[starts[-1].end():]  # the last START: the small-print form comes before the real one in some files
    end = _END.search(body)
    if end:
        body = body[:end.start()]
    body = _CREDIT.sub("", body, count=1)
    body = _END_LINE.sub("", body)
    return body.strip() + "\n"


@dataclass
class GutenbergFilter(Step):
    """Cut a Gutenberg book to the text between its START and END markers (see module docstring)."""

    name = "gutenberg"
    modifies = True
    missing: Literal["keep", "reject"] = option("keep", help="a text without a START marker: keep as is "
                                                             "(counted as no_markers) or reject")
    _counts: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __call__(self, doc: Document) -> str | None:
        book = strip_gutenberg(doc.text)
        if book is None:
            self._counts["no_markers"] = self._counts.get("no_markers", 0) + 1
            return "no_gutenberg_markers" if self.missing == "reject" else None
        if not book.strip():
            return "empty_after_gutenberg_boilerplate"
        self._counts["stripped_chars"] = self._counts.get("stripped_chars", 0) + len(doc.text) - len(book)
        doc.text = book
        return None

    def pop_counters(self) -> dict[str, int]:
        counts, self._counts = self._counts, {}
        return counts
