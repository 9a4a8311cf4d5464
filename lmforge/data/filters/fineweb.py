"""FineWeb's own quality rules (Penedo et al. 2024, "The FineWeb Datasets", Sec. 3.3), as datatrove's
FineWebQualityFilter implements them: lines ending in punctuation, short lines, duplicated line
characters, and list-like pages (newlines per word)."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.core.config import option
from lmforge.data.filters.gopher import duplicates
from lmforge.data.filters.text import TERMINAL_PUNCTUATION, words
from lmforge.data.readers import Document
from lmforge.data.steps import Step


@dataclass
class FineWebQuality(Step):
    """Reject pages with few punctuated lines, many short lines, duplicated lines or list structure."""

    name = "fineweb"
    line_punct_thr: float = option(0.12, help="fewest lines ending in terminal punctuation (fraction)")
    line_punct_exclude_zero: bool = option(False, help="do not reject pages where no line ends in punctuation")
    short_line_thr: float = option(0.67, help="most lines that are short (fraction)")
    short_line_length: int = option(30, help="a line this long or shorter is short")
    char_duplicates_ratio: float = option(0.01, help="most characters in duplicated lines (fraction)")
    new_line_ratio: float = option(0.3, help="most newlines per word")

    def __call__(self, doc: Document) -> str | None:
        lines = [line for line in doc.text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        ratio = sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines)
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return "line_punct_ratio"
        if sum(len(line) <= self.short_line_length for line in lines) / len(lines) > self.short_line_thr:
            return "short_line_ratio"
        if duplicates(lines)[1] / max(1, len(doc.text) - doc.text.count("\n")) > self.char_duplicates_ratio:
            return "char_dup_ratio"
        if doc.text.count("\n") / max(1, len(words(doc.text))) > self.new_line_ratio:
            return "list_ratio"
        return None
