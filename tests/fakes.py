"""Small stand-ins shared by tests."""

from __future__ import annotations

from typing import Any


class RepeatedBatch:
    """One batch forever, with the resumable-source methods `train_loop` expects."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def next_batch(self) -> Any:
        return self.batch

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def learnable_shards(directory: Any, vocab: int, n_tokens: int, max_shard_tokens: int) -> Any:
    """A shard set a tiny model learns fast: one 50-id 'sentence' repeated, 5% noise, 10 documents."""
    import numpy as np

    from lmforge.data.shards import ShardSet, ShardWriter

    rng = np.random.default_rng(0)
    stream = np.resize(rng.integers(0, vocab, 50), n_tokens)
    noise = rng.random(stream.size) < 0.05
    stream[noise] = rng.integers(0, vocab, noise.sum())
    with ShardWriter(directory, vocab, max_shard_tokens=max_shard_tokens) as w:
        for doc in np.array_split(stream, 10):
            w.add(doc, n_bytes=len(doc))
    return ShardSet(directory)
