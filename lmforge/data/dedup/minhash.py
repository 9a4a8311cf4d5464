"""MinHash-LSH near-duplicate removal (Broder 1997; bands as in Leskovec et al., "Mining of Massive
Datasets", Sec. 3.4), with FineWeb's defaults: word 5-grams, 14 bands x 8 rows, 64-bit xxhash.

Two documents with Jaccard similarity s share at least one band with probability 1 - (1 - s^r)^b
(r = 8 rows, b = 14 bands; `collision_probability`): 0.988 at s = 0.85, 0.92 at 0.8, 0.053 at 0.5,
0.009 at 0.4.
Candidates sharing any band are joined into clusters (connected components, the result of
union-find over all band collisions) and each cluster keeps its first document in shard order.
A document with fewer than `n_grams` words has no shingle: like datatrove, MinHash leaves it alone
(it is never a duplicate nor the original of one), so empty and very short documents are not all
lumped into one cluster. Exact dedup and the length filters are the steps for those.

Everything per document is numpy: words are hashed once (xxh64 of each distinct word), n-gram
hashes are combined from word hashes, the b*r permutations are a vectorized multiply-add mod 2^64
(a multiply-shift universal family) reduced by `min`, and bands are folded to one 64-bit key each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from lmforge.core.config import option
from lmforge.data.filters.text import ngram_hashes
from lmforge.data.readers import Document
from lmforge.data.steps import Barrier

_NORM_WORD_RE = re.compile(r"[^\W_]+")  # lowercase letters/digits runs: punctuation and case do not matter
_DIGITS_RE = re.compile(r"\d+")
CHUNK = 4096  # shingles per block: bounds memory (CHUNK x b*r uint64) for very long documents


def collision_probability(s: float, bands: int = 14, rows: int = 8) -> float:
    """P(two documents of Jaccard s share a band) = 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - s**rows) ** bands


def normalize_words(text: str) -> list[str]:
    """FineWeb-style simplification before shingling: lowercase, numbers to 0, punctuation dropped."""
    return _NORM_WORD_RE.findall(_DIGITS_RE.sub("0", text.lower()))


def shingles(text: str, n: int) -> np.ndarray:
    """Distinct 64-bit hashes of the word n-grams; none for a document of fewer than n words."""
    toks = normalize_words(text)
    if len(toks) < n:
        return np.zeros(0, dtype=np.uint64)
    table = {w: xxhash.xxh64_intdigest(w.encode()) for w in set(toks)}
    ids = np.fromiter((table[w] for w in toks), dtype=np.uint64, count=len(toks))
    return np.unique(ngram_hashes(ids, n))


@dataclass
class MinHashDedup(Barrier):
    """Remove near-duplicates; the reason names the kept document of the cluster."""

    name = "minhash"
    n_grams: int = option(5, help="words per shingle")
    bands: int = option(14, help="LSH bands")
    rows: int = option(8, help="hashes per band")
    seed: int = option(1, help="seed of the hash permutations")
    _params: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)

    def params(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._params is None:
            rng = np.random.default_rng(self.seed)
            k = self.bands * self.rows
            a = rng.integers(1, 2**63, size=k, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd multipliers
            b = rng.integers(0, 2**63, size=k, dtype=np.uint64)
            fold = rng.integers(1, 2**63, size=self.rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
            self._params = (a, b, fold)
        return self._params

    def signature(self, text: str) -> np.ndarray:
        """b*r minimum hash values (all max for a document with no shingle: see `no_shingle_key`)."""
        a, b, _ = self.params()
        sig = np.full(len(a), np.iinfo(np.uint64).max, dtype=np.uint64)
        sh = shingles(text, self.n_grams)
        with np.errstate(over="ignore"):
            for start in range(0, len(sh), CHUNK):
                block = sh[start:start + CHUNK, None] * a[None, :] + b[None, :]
                np.minimum(sig, block.min(axis=0), out=sig)
        return sig

    def key(self, doc: Document) -> np.ndarray:
        """One 64-bit key per band (the band's `rows` values folded with odd multipliers)."""
        _, _, fold = self.params()
        sig = self.signature(doc.text).reshape(self.bands, self.rows)
        with np.errstate(over="ignore"):
            return (sig * fold[None, :]).sum(axis=1, dtype=np.uint64) ^ np.arange(self.bands, dtype=np.uint64)

    def no_shingle_key(self) -> np.ndarray:
        """The band keys of a document without shingles (every signature value at its maximum)."""
        _, _, fold = self.params()
        sig = np.full((self.bands, self.rows), np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            return (sig * fold[None, :]).sum(axis=1, dtype=np.uint64) ^ np.arange(self.bands, dtype=np.uint64)

    def resolve(self, keys: Sequence[list[Any]], ids: Sequence[list[str]]) -> list[Any]:
        sizes = [len(k) for k in keys]
        all_keys = [np.asarray(k, dtype=np.uint64).reshape(-1, self.bands) for k in keys]
        band_keys = np.concatenate(all_keys) if all_keys else np.zeros((0, self.bands), np.uint64)
        root = cluster_roots(band_keys, skip=(band_keys == self.no_shingle_key()[None, :]).all(axis=1))
        flat_ids = [i for shard in ids for i in shard]
        plans, offset = [], 0
        for size in sizes:
            r = root[offset:offset + size]
            dup = np.flatnonzero(r != np.arange(offset, offset + size))
            plans.append({int(i): flat_ids[int(r[i])] for i in dup})
            offset += size
        return plans

    def apply(self, doc: Document, index: int, plan: dict[int, str]) -> str | None:
        if index not in plan:
            return None
        doc.metadata["duplicate_of"] = plan[index]
        return "near_duplicate"


def cluster_roots(band_keys: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
    """For each document the smallest index in its cluster: connected components of the graph joining
    documents that share a key in any band (what union-find computes), by min-label propagation.
    Documents where `skip` is true stay alone."""
    n = len(band_keys)
    label = np.arange(n)
    if skip is not None and skip.any():
        rows = np.flatnonzero(~skip)
        label[rows] = rows[cluster_roots(band_keys[rows])]
        return label
    if n == 0:
        return label
    groups = []
    for b in range(band_keys.shape[1]):
        _, inverse, counts = np.unique(band_keys[:, b], return_inverse=True, return_counts=True)
        if (counts > 1).any():
            groups.append((inverse, len(counts)))
    changed = True
    while changed:
        changed = False
        for inverse, n_groups in groups:
            group_min = np.full(n_groups, n, dtype=np.int64)
            np.minimum.at(group_min, inverse, label)
            new = np.minimum(label, group_min[inverse])
            new = new[new]  # pointer jumping: follow labels to their own labels
            if (new != label).any():
                label, changed = new, True
    return label
