"""C4 cleaning rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", Sec. 2.2).

Line rules edit the text (lines without terminal punctuation, with fewer than 3 words, mentioning
javascript or cookie/terms policies are dropped; Wikipedia citation marks removed); page rules reject
(lorem ipsum, a curly bracket, fewer than 5 sentences after line filtering). Defaults and reason names
as in datatrove's C4QualityFilter, which follows the TFDS reference code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmforge.core.config import option
from lmforge.data.filters.text import sentences
from lmforge.data.readers import Document
from lmforge.data.steps import Step

CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                     "use cookies")


@dataclass
class C4Quality(Step):
    """C4's line and page rules (see module docstring)."""

    name = "c4"
    modifies = True
    remove_citations: bool = option(True, help="strip [1], [edit], [citation needed]")
    filter_no_terminal_punct: bool = option(True, help="drop lines not ending in . ? ! \" '")
    min_num_sentences: int = option(5, help="fewest sentences left after line filtering (-1: off)")
    min_words_per_line: int = option(3, help="drop lines with fewer words (-1: off)")
    max_word_length: int = option(1000, help="drop lines holding a longer word (-1: off)")
    filter_lorem_ipsum: bool = option(True, help="reject pages containing 'lorem ipsum'")
    filter_javascript: bool = option(True, help="drop lines mentioning javascript")
    filter_curly_bracket: bool = option(True, help="reject pages containing '{'")
    filter_policy: bool = option(True, help="drop lines about cookies / terms of use")

    def __call__(self, doc: Document) -> str | None:
        kept: list[str] = []
        n_sentences = 0
        for line in doc.text.splitlines():
            line = line.strip()
            n_words = len(line.split())
            if self.max_word_length != -1 and n_words and max(map(len, line.split())) > self.max_word_length:
                continue
            if self.remove_citations and "[" in line:
                line = CITATION_RE.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
                continue
            if n_words < self.min_words_per_line:
                continue
            lower = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lower:
                return "lorem_ipsum"
            if self.filter_javascript and "javascript" in lower:
                continue
            if self.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if self.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS):
                continue
            if self.min_num_sentences != -1:
                n_sentences += len(sentences(line))
            kept.append(line)
        if n_sentences < self.min_num_sentences:
            return "too_few_sentences"
        doc.text = "\n".join(kept).strip()
        return None
