"""Training batches from token shards: shuffled contiguous windows with exact resume."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lmforge.core.errors import LmforgeError
from lmforge.data.shards import ShardSet


class SequenceLoader:
    """Contiguous windows of seq_len+1 tokens -> (inputs, targets) LongTensors [batch_size, seq_len].

    Window i starts at token i*seq_len and holds seq_len+1 tokens, so consecutive windows overlap
    by the one token that is the last target of one and the first input of the next: every token
    but the first is a target exactly once per epoch. Windows cross document boundaries (documents
    are separated by the eos token the tokenizer appended), as in GPT-2-style packed pretraining.
    The order of windows is a permutation drawn from np.random.default_rng(seed + epoch) (or
    sequential when shuffle=False); epochs roll over forever, and a batch may straddle two epochs.
    Under data parallelism each of `world_size` ranks gets a disjoint `batch_size` slice of one
    global batch of batch_size * world_size windows.
    With `order_scores` (one per window, e.g. from `lmforge.train.curriculum.window_scores`) each
    epoch serves windows by ascending score, ties in the epoch's shuffled order: the "easy first"
    ordering of curriculum learning (Bengio et al. 2009).
    Exact resume: state_dict() -> {"epoch": int, "cursor": int} (JSON-serializable);
    load_state_dict() restores it so the next batch equals what an uninterrupted run would get.
    """

    def __init__(self, shards: ShardSet, batch_size: int, seq_len: int, seed: int = 0,
                 shuffle: bool = True, *, rank: int = 0, world_size: int = 1,
                 order_scores: np.ndarray | None = None) -> None:
        if batch_size <= 0:
            raise LmforgeError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise LmforgeError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seq_len <= 0:
            raise LmforgeError(f"seq_len must be positive, got {seq_len}")
        self.shards = shards
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.n_windows = (shards.n_tokens - 1) // seq_len if shards.n_tokens else 0
        if self.n_windows == 0:
            raise LmforgeError(f"shard set at {shards.directory} has {shards.n_tokens} tokens, fewer than "
                               f"seq_len+1 ({seq_len + 1})")
        if order_scores is not None and len(order_scores) != self.n_windows:
            raise LmforgeError(f"order_scores has {len(order_scores)} entries for the {self.n_windows} windows of "
                               f"{shards.directory} at seq_len {seq_len}")
        self.order_scores = order_scores
        self.epoch = 0
        self.cursor = 0  # position in this epoch's window order of the next window to serve
        self._order = self._window_order(0)

    def _window_order(self, epoch: int) -> np.ndarray:
        order = (np.random.default_rng(self.seed + epoch).permutation(self.n_windows) if self.shuffle
                 else np.arange(self.n_windows))
        if self.order_scores is not None:
            order = order[np.argsort(self.order_scores[order], kind="stable")]
        return order

    def next_windows(self, n: int) -> np.ndarray:
        """Indices of the next `n` windows, advancing the cursor (and the epoch when it wraps)."""
        out = np.empty(n, dtype=np.int64)
        done = 0
        while done < n:
            take = min(n - done, self.n_windows - self.cursor)
            out[done:done + take] = self._order[self.cursor:self.cursor + take]
            done += take
            self.cursor += take
            if self.cursor == self.n_windows:
                self.epoch += 1
                self.cursor = 0
                self._order = self._window_order(self.epoch)
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Every rank draws the same global batch and keeps its own slice, so ranks never overlap
        # and the resume state is the same on all of them.
        windows = self.next_windows(self.batch_size * self.world_size)
        windows = windows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return to_batch(self.read_windows(windows))

    def read_windows(self, windows: np.ndarray) -> np.ndarray:
        """Tokens of the given windows, int64 [len(windows), seq_len + 1]."""
        return np.stack([self.shards.read(int(w) * self.seq_len, self.seq_len + 1) for w in windows])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, cursor = state.get("epoch"), state.get("cursor")
        for name, value in (("epoch", epoch), ("cursor", cursor)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise LmforgeError(f"loader state: '{name}' must be a non-negative integer, got {value!r}")
        if cursor >= self.n_windows:
            raise LmforgeError(f"loader state: cursor {cursor} is past the {self.n_windows} windows of "
                               f"{self.shards.directory} at seq_len {self.seq_len} "
                               "(resuming on different data or seq_len?)")
        self.epoch, self.cursor = epoch, cursor
        self._order = self._window_order(epoch)


def to_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, seq_len + 1] token rows -> (inputs, targets), each [n, seq_len], targets shifted by one."""
    tokens = torch.from_numpy(rows)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
