"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models", Appendix A, Table A1).

Defaults are the paper's, as datatrove implements them (its reason names are kept, so rejects can be
compared line for line). Repetition n-gram statistics are computed on integer n-gram hashes with numpy
instead of joined strings: same counts, no per-n-gram Python objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from lmforge.core.config import option
from lmforge.data.filters.text import PUNCTUATION, ngram_hash_series, word_ids, words
from lmforge.data.readers import Document
from lmforge.data.steps import Step

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
_PARAGRAPH_RE = re.compile(r"\n{2,}")
_LINES_RE = re.compile(r"\n+")
_HAS_LETTER = re.compile(r"[^\W\d_]").search


@dataclass
class GopherQuality(Step):
    """Document-level quality heuristics: length, mean word length, symbols, bullets, alphabetic words,
    stop words."""

    name = "gopher_quality"
    min_doc_words: int = option(50, help="fewest non-symbol words")
    max_doc_words: int = option(100_000, help="most non-symbol words")
    min_avg_word_length: float = option(3, help="shortest mean word length")
    max_avg_word_length: float = option(10, help="longest mean word length")
    max_symbol_word_ratio: float = option(0.1, help="most '#' or ellipses per word")
    max_bullet_lines_ratio: float = option(0.9, help="most lines starting with a bullet")
    max_ellipsis_lines_ratio: float = option(0.3, help="most lines ending with an ellipsis")
    min_alpha_words_ratio: float = option(0.8, help="fewest words holding a letter")
    min_stop_words: int = option(2, help="fewest distinct stop words present")
    stop_words: list[str] = option(default_factory=lambda: list(STOP_WORDS), help="the stop words")

    def __call__(self, doc: Document) -> str | None:
        text = doc.text
        toks = words(text)
        n_words = len(toks)
        lengths = [len(w) for w in toks if not PUNCTUATION.issuperset(w)]
        n = len(lengths)
        if n < self.min_doc_words:
            return "gopher_short_doc"
        if n > self.max_doc_words:
            return "gopher_long_doc"
        avg = sum(lengths) / n
        if avg < self.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if avg > self.max_avg_word_length:
            return "gopher_above_avg_threshold"
        if text.count("#") / n_words > self.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = text.splitlines() or [""]
        bullets = sum(line.lstrip().startswith(("•", "-")) for line in lines)
        if bullets / len(lines) > self.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        ellipsis = sum(line.rstrip().endswith(("...", "…")) for line in lines)
        if ellipsis / len(lines) > self.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
        alpha = sum(1 for w in toks if _HAS_LETTER(w))
        if alpha / n_words < self.min_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if len(set(self.stop_words).intersection(toks)) < self.min_stop_words:
            return "gopher_enough_stop_words"
        return None


def duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier one, their total characters)."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


def top_ngram_chars(hashes: np.ndarray, window_chars: np.ndarray) -> int:
    """Characters covered by the most frequent n-gram (count × its length; ties: first seen wins)."""
    _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    best = counts.max()
    winner = first[counts == best].min()
    return int(window_chars[winner]) * int(best)


def duplicate_ngram_chars(hashes: np.ndarray, window_chars: np.ndarray, n: int) -> int:
    """Characters in n-grams that repeat an earlier one, scanning left to right and jumping past each
    repeat (Gopher's "duplicate n-gram character fraction" as datatrove counts it).

    Only windows whose n-gram occurred earlier can be repeats, so the Python loop runs over those few
    candidates; a first occurrence counts as seen unless an earlier repeat's jump skipped it.
    """
    m = len(hashes)
    if m == 0:
        return 0
    _, first_idx, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    first_of = first_idx[inverse]
    candidates = np.flatnonzero(first_of < np.arange(m))
    if len(candidates) == 0:
        return 0
    skipped = np.zeros(m, dtype=bool)
    added_labels: set[int] = set()
    pos = repeated = 0
    for c in candidates.tolist():
        if c < pos:
            continue
        label = int(inverse[c])
        if not skipped[first_of[c]] or label in added_labels:
            repeated += int(window_chars[c])
            skipped[c + 1:c + n] = True
            pos = c + n
        else:
            added_labels.add(label)
            pos = c + 1
    return repeated


@dataclass
class GopherRepetition(Step):
    """Repetition heuristics: duplicate lines/paragraphs, top n-gram and duplicate n-gram character fractions."""

    name = "gopher_repetition"
    dup_line_frac: float = option(0.3, help="most duplicate lines (fraction of lines)")
    dup_para_frac: float = option(0.3, help="most duplicate paragraphs (fraction of paragraphs)")
    dup_line_char_frac: float = option(0.2, help="most characters in duplicate lines")
    dup_para_char_frac: float = option(0.2, help="most characters in duplicate paragraphs")
    top_n_grams: dict[str, float] = option(default_factory=lambda: {"2": 0.2, "3": 0.18, "4": 0.16},
                                           help="n -> most characters in the top n-gram")
    dup_n_grams: dict[str, float] = option(
        default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10},
        help="n -> most characters in duplicate n-grams")

    def __call__(self, doc: Document) -> str | None:
        text = doc.text
        if not text:
            return "empty"
        paragraphs = _PARAGRAPH_RE.split(text.strip())
        n_dup, chars = duplicates(paragraphs)
        if n_dup / len(paragraphs) > self.dup_para_frac:
            return "dup_para_frac"
        if chars / len(text) > self.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINES_RE.split(text)
        n_dup, chars = duplicates(lines)
        if n_dup / len(lines) > self.dup_line_frac:
            return "dup_line_frac"
        if chars / len(text) > self.dup_line_char_frac:
            return "dup_line_char_frac"
        ids = word_ids(text)
        if len(ids) == 0:
            return None
        lengths = np.fromiter(map(len, words(text)), dtype=np.int64, count=len(ids))
        cum = np.concatenate([[0], np.cumsum(lengths)])
        hashes = ngram_hash_series(ids, max(map(int, [*self.top_n_grams, *self.dup_n_grams]), default=1))
        for n_str, frac in self.top_n_grams.items():
            n = int(n_str)
            if len(ids) < n:
                continue
            window = cum[n:] - cum[:-n] + (n - 1)  # " ".join of the n words
            if top_ngram_chars(hashes[n], window) / len(text) > frac:
                return f"top_{n}_gram"
        for n, frac in sorted((int(n), frac) for n, frac in self.dup_n_grams.items()):
            if len(ids) < n:
                break
            ordered = np.sort(hashes[n])
            if not (ordered[1:] == ordered[:-1]).any():
                break  # no n-gram repeats, so no longer one can: every remaining fraction is 0
            window = cum[n:] - cum[:-n]  # "".join of the n words
            if duplicate_ngram_chars(hashes[n], window, n) / len(text) > frac:
                return f"duplicated_{n}_n_grams"
        return None
