"""Stand-ins for what a training run reads: batch sources with the resumable-source methods `train_loop`
expects, and small shard sets written on the spot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.shards import ShardSet, ShardWriter


class RepeatedBatch:
    """One batch forever, counting how many it served (the count is its resumable state)."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self.served = 0

    def next_batch(self) -> Any:
        self.served += 1
        return self.batch

    def state_dict(self) -> dict[str, Any]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.served = state.get("served", 0)


class Crash(RuntimeError):
    """What `CrashAfter` raises: a run that dies mid-training."""


class CrashAfter:
    """Wraps a batch source and raises `Crash` after `n` batches."""

    def __init__(self, inner: Any, n: int) -> None:
        self.inner, self.n = inner, n

    def next_batch(self) -> Any:
        if self.n == 0:
            raise Crash("crash")
        self.n -= 1
        return self.inner.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def learnable_shards(directory: Path, vocab: int = 64, n_tokens: int = 4000, max_shard_tokens: int = 1500,
                     n_docs: int = 10, bytes_per_token: int = 1, seed: int = 0) -> ShardSet:
    """A stream a tiny model learns fast: one random 50-id 'sentence' repeated, 5% of ids replaced by noise,
    cut into `n_docs` documents."""
    rng = np.random.default_rng(seed)
    stream = np.resize(rng.integers(0, vocab, 50), n_tokens)
    noise = rng.random(n_tokens) < 0.05
    stream[noise] = rng.integers(0, vocab, noise.sum())
    with ShardWriter(directory, vocab, max_shard_tokens=max_shard_tokens) as w:
        for doc in np.array_split(stream, n_docs):
            w.add(doc, n_bytes=bytes_per_token * len(doc))
    return ShardSet(directory)


SOURCE_OFFSET = 10_000  # mixture source k holds ids k * SOURCE_OFFSET + position: a row reveals its source and window


def mixture_source(path: Path, k: int, n_tokens: int, vocab: int = 1 << 16, doc_len: int = 13,
                   seed: int = 0) -> ShardSet:
    """Mixture source k: documents of `doc_len` tokens numbered by position (or random ids below `vocab` when
    the vocabulary is too small for that)."""
    rng = np.random.default_rng(seed + k)
    with ShardWriter(path, vocab, tokenizer_sha256="t", eos_id=0, max_shard_tokens=97) as w:
        for start in range(0, n_tokens, doc_len):
            end = min(start + doc_len, n_tokens)
            if vocab > SOURCE_OFFSET * 4:
                ids = np.arange(start, end) + k * SOURCE_OFFSET
            else:
                ids = rng.integers(1, vocab, end - start)
            w.add(ids, n_bytes=3 * (end - start))
    return ShardSet(path)
