"""Shared text splitting for the filters, cached per text so a chain of filters splits each document once.

Words follow spaCy's English tokenizer (what datatrove's filters use) closely enough for their ratios:
whitespace-separated chunks with leading/trailing punctuation split off one character at a time
(inner punctuation stays: "sys.path", "call'd"), the tokenizer's English exceptions approximated
(see WORD_RE), "..." and "--" kept whole. Measured against datatrove on tinyshakespeare + stdlib text,
filter decisions agree on ~99% of documents (tests/test_clean_filters.py, benchmarks/data_pipeline.py).
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

import numpy as np

# spaCy's English exceptions, in short: "n't" splits off these verbs, "'d 'll 're 've 'm" off these pronouns,
# "'s" off any word, "cannot" is "can" + "not", hyphens between letters are their own token
_NT_VERBS = "ca|could|do|does|did|had|has|have|may|might|must|need|ought|sha|should|wo|would|ai|are|is|was|were|dare"
_PRONOUNS = "i|you|he|she|it|we|they|who|what|where|when|why|how|there|that|let"
WORD_RE = re.compile("|".join((
    r"(?!(?i:cannot)\b)\w+(?=[^\w\s'’-]*(?:\s|$))(?<!\b[A-Za-z](?=\.(?:\s|$)))",  # fast path: a plain word
    rf"\b(?i:{_NT_VERBS})(?=(?i:n['’]t)\b)", r"(?i:n['’]t)\b",
    rf"\b(?i:{_PRONOUNS})(?=['’](?i:d|ll|re|ve|m)\b)", r"\b(?i:can)(?=(?i:not)\b)", r"(?<!\S)['’](?i:em)\b",
    r"['’](?i:s|d|ll|re|ve|m)(?![\w'’])",
    r"(?<!\S)\S*?\w[^\w\s]*-(?=\s|$)", r"(?<!\S)[A-Za-z]\.(?=\s|$)",  # "thee,--" and "I." stay whole
    r"\w(?:\S*?\w)??(?:(?=(?:['’][sS])?[^\w\s]*(?:\s|$))|(?<=[^\W\d_])(?=-[^\W\d_])|(?=--+\w))",  # a core
    r"\.\.\.+", "--+", r"[^\w\s]")))
PUNCTUATION = frozenset(string.punctuation + "—”“’‘«»…–")
SENTENCE_END_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
# sentence-final marks across scripts (Latin, CJK full-width, Devanagari, Arabic, Armenian, Ethiopic, Burmese,
# Khmer); FineWeb's line-punctuation rule counts a line ending in any of them
TERMINAL_PUNCTUATION = (".", "!", "?", "‼", "‽", "⁇", "⁈", "⁉", "。", "！", "？", "．", "｡", "।", "॥", "؟", "۔",
                        "։", "።", "፧", "၊", "။", "។", "៕")


@lru_cache(maxsize=8)
def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


@lru_cache(maxsize=8)
def word_ids(text: str) -> np.ndarray:
    """Each word as a 64-bit hash-mixed integer id (equal words, equal ids within the text)."""
    toks = words(text)
    index = {w: i for i, w in enumerate(dict.fromkeys(toks))}
    return mix64(np.fromiter(map(index.__getitem__, toks), dtype=np.uint64, count=len(toks)))


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads small integers over 64 bits so sums of them rarely collide."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window of n ids (Horner over position-rotated ids, wrapping in uint64)."""
    return ngram_hash_series(ids, n)[n]


def ngram_hash_series(ids: np.ndarray, max_n: int) -> dict[int, np.ndarray]:
    """{n: hashes of every window of n ids} for n = 1..max_n, each built from the n-1 one in one step."""
    out: dict[int, np.ndarray] = {}
    h = np.zeros(len(ids), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(max_n):
            m = len(ids) - k
            if m <= 0:
                out.update((n, np.zeros(0, dtype=np.uint64)) for n in range(k + 1, max_n + 1))
                break
            r = np.uint64((k * 13) % 63 + 1)  # a distinct rotation per position keeps "a b" and "b a" apart
            x = ids[k:k + m]
            h = h[:m] * np.uint64(0x100000001B3) + ((x << r) | (x >> (np.uint64(64) - r)))
            out[k + 1] = h
    return out


def sentences(text: str) -> list[str]:
    """Sentences by terminal punctuation followed by space (a light stand-in for a punkt/spaCy splitter)."""
    return [s for s in SENTENCE_END_RE.split(text) if s.strip()]
