"""MinHash-LSH near-duplicate removal (Broder 1997; bands as in Leskovec et al., "Mining of Massive
Datasets", Sec. 3.4), with FineWeb's defaults: word 5-grams, 14 bands x 8 rows, 64-bit xxhash.

Two documents with Jaccard similarity s share at least one band with probability 1 - (1 - s^r)^b
(r = 8 rows, b = 14 bands; `collision_probability`): 0.988 at s = 0.85, 0.92 at 0.8, 0.053 at 0.5,
0.009 at 0.4.

Signatures are datatrove's (the FineWeb pipeline), so the same corpus gives the same clusters:
text simplified (lowercase, numbers to 0, punctuation to spaces, diacritics dropped), each word
5-gram hashed with xxh64 of its words joined by spaces, and the b*r hash functions
(a*x + b) mod (2^61 - 1) with a, b drawn by numpy's `RandomState(seed)`. A band's 8 minima are
folded to one 64-bit key. Datatrove tokenizes English words with spaCy, which also splits a few
contractions ("cannot" -> "can not"); splitting on spaces is the one difference left.

Documents sharing a band key are joined into clusters (connected components). Which copy survives
is `keep`: "datatrove" replays datatrove's union-find (band by band, documents sorted by band value
then position, union by size: the copy at the root of the larger part survives, ties to the earlier
one); "first" keeps the first copy in shard order.
A document with fewer than `n_grams` words has no shingle: like datatrove, MinHash leaves it alone
(it is never a duplicate nor the original of one), so empty and very short documents are not all
lumped into one cluster. Exact dedup and the length filters are the steps for those.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from lmforge.core.config import option, require
from lmforge.data.readers import Document
from lmforge.data.steps import Barrier

MERSENNE_61 = np.uint64((1 << 61) - 1)
_NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)?")  # "3.14" and "1,000" are one number, as in datatrove
_PUNCT_RE = re.compile(r"[^\w\s]|_")
CHUNK = 4096  # shingles per block: bounds memory (CHUNK x b*r uint64) for very long documents
SURVIVORS = ("datatrove", "first")


def collision_probability(s: float, bands: int = 14, rows: int = 8) -> float:
    """P(two documents of Jaccard s share a band) = 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - s**rows) ** bands


def normalize_words(text: str) -> list[str]:
    """datatrove's `simplify_text` then a split on spaces: lowercase, numbers to 0, punctuation to spaces,
    diacritics dropped."""
    text = _PUNCT_RE.sub(" ", _NUMBER_RE.sub("0", text.lower()))
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return text.split()


def shingles(text: str, n: int) -> np.ndarray:
    """xxh64 of each word n-gram (words joined by a space); none for a document of fewer than n words."""
    toks = normalize_words(text)
    if len(toks) < n:
        return np.zeros(0, dtype=np.uint64)
    h = xxhash.xxh64_intdigest
    return np.fromiter((h(" ".join(toks[i:i + n]).encode()) for i in range(len(toks) - n + 1)),
                       dtype=np.uint64, count=len(toks) - n + 1)


@dataclass
class MinHashDedup(Barrier):
    """Remove near-duplicates; the reason names the kept document of the cluster."""

    name = "minhash"
    n_grams: int = option(5, help="words per shingle")
    bands: int = option(14, help="LSH bands")
    rows: int = option(8, help="hashes per band")
    seed: int = option(1, help="seed of the hash permutations")
    keep: str = option("datatrove", help="which copy of a cluster survives: datatrove (its union-find root) "
                                         "or first (first in shard order)")
    _params: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        require(self.keep in SURVIVORS, "minhash.keep", self.keep, "one of " + ", ".join(SURVIVORS))

    def params(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._params is None:
            k = self.bands * self.rows
            gen = np.random.RandomState(self.seed)  # datatrove's draws, in its order
            a = gen.randint(1, MERSENNE_61, dtype=np.uint64, size=k)
            b = gen.randint(0, MERSENNE_61, dtype=np.uint64, size=k)
            fold = np.random.default_rng(self.seed).integers(1, 2**63, size=self.rows, dtype=np.uint64)
            self._params = (a, b, fold * np.uint64(2) + np.uint64(1))  # odd multipliers fold a band
        return self._params

    def signature(self, text: str) -> np.ndarray:
        """b*r minimum hash values (all max for a document with no shingle: see `no_shingle_key`)."""
        a, b, _ = self.params()
        sig = np.full(len(a), np.iinfo(np.uint64).max, dtype=np.uint64)
        sh = shingles(text, self.n_grams)
        with np.errstate(over="ignore"):
            for start in range(0, len(sh), CHUNK):
                block = (sh[start:start + CHUNK, None] * a[None, :] + b[None, :]) % MERSENNE_61
                np.minimum(sig, block.min(axis=0), out=sig)
        return sig

    def _fold(self, sig: np.ndarray) -> np.ndarray:
        """Per band: one 64-bit key (its `rows` values folded), then its first value (datatrove's sort order)."""
        _, _, fold = self.params()
        sig = sig.reshape(self.bands, self.rows)
        with np.errstate(over="ignore"):
            keys = (sig * fold[None, :]).sum(axis=1, dtype=np.uint64) ^ np.arange(self.bands, dtype=np.uint64)
        return np.concatenate([keys, sig[:, 0]])

    def key(self, doc: Document) -> np.ndarray:
        return self._fold(self.signature(doc.text))

    def no_shingle_key(self) -> np.ndarray:
        """The key of a document without shingles (every signature value at its maximum)."""
        return self._fold(np.full(self.bands * self.rows, np.iinfo(np.uint64).max, dtype=np.uint64))

    def resolve(self, keys: Sequence[list[Any]], ids: Sequence[list[str]]) -> list[Any]:
        sizes = [len(k) for k in keys]
        all_keys = [np.asarray(k, dtype=np.uint64).reshape(-1, 2 * self.bands) for k in keys]
        rows = np.concatenate(all_keys) if all_keys else np.zeros((0, 2 * self.bands), np.uint64)
        skip = (rows == self.no_shingle_key()[None, :]).all(axis=1)
        band_keys, first_values = rows[:, :self.bands], rows[:, self.bands:]
        if self.keep == "first":
            root = cluster_roots(band_keys, skip=skip)
        else:
            root = datatrove_roots(band_keys, first_values, skip=skip)
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


def datatrove_roots(band_keys: np.ndarray, first_values: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
    """For each document the root of its cluster as datatrove's union-find leaves it: band by band,
    documents sorted by (band value, position), each one joined with the one before it when their band
    values are equal; a union hangs the smaller set under the root of the larger, ties under the first."""
    n = len(band_keys)
    parent: dict[int, int] = {}  # only documents in some collision; the rest are their own roots
    size: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    live = np.arange(n) if skip is None else np.flatnonzero(~skip)
    for b in range(band_keys.shape[1]):
        order = live[np.lexsort((live, band_keys[live, b], first_values[live, b]))]
        same = band_keys[order[1:], b] == band_keys[order[:-1], b]
        for x, y in zip(order[:-1][same].tolist(), order[1:][same].tolist()):
            ra, rb = find(x), find(y)
            if ra == rb:
                continue
            if size.get(ra, 1) < size.get(rb, 1):
                ra, rb = rb, ra
            parent[rb] = ra
            size[ra] = size.get(ra, 1) + size.pop(rb, 1)
    root = np.arange(n)
    for x in list(parent):
        root[x] = find(x)
    return root
