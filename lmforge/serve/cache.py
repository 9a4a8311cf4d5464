"""A KV cache with one row ("slot") per running request, each at its own length.

`lmforge.model.attention.KVCache` (and MLA's `LatentCache`) write every row of a batch at the same
position, which suits a batch that starts together. Continuous batching does not: requests join and leave between decode
steps, so each row has its own length. `SlotCache` keeps the same `update(layer, k, v, start)`
contract the attention layers call, and is switched by the scheduler between two modes:

- `prefill(row)`: the forward pass is one request's prompt (batch 1); it is written into `row`
  from slot `start` on, exactly as a fresh single-sequence cache would be.
- `decode(lengths)`: the forward pass is one new token for each of the first n rows; row i's token
  is written at slot lengths[i] (its own length), and attention reads keys up to the longest row.
  The caller masks keys past each row's length (`decode_mask`).

Active requests always occupy rows 0..n-1 (`move` fills the hole a finished request leaves), so
decode reads a view of the cache, never a gathered copy.
"""

from __future__ import annotations

import torch
from torch import nn


class SlotCache:
    """Wraps the model's own cache (`model.new_cache(slots, max_len)`: keys and values, or MLA's latent and
    rope key) and writes its per-layer buffers [slots, ..., time, dim] row by row."""

    def __init__(self, model: nn.Module, slots: int, max_len: int) -> None:
        base = model.new_cache(slots, max_len)
        if hasattr(base, "joint"):  # MLA: one [layers, slots, T, latent + rope key] buffer, written in two parts
            self.storage = [base.kv]
            self.buffers = [base.latent, base.rope_key]
        else:
            self.storage = self.buffers = [base.k, base.v]
        # `buffers`: views in the order `update` receives them, [layers, slots, ..., T, dim]
        self.slots, self.max_len = slots, max_len
        self._n = 0
        self._row: int | None = None
        self._lengths: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._width = 0

    def prefill(self, row: int) -> None:
        """The next forward passes write one sequence into `row` at their `start` slot."""
        if not 0 <= row < self.slots:
            raise ValueError(f"row {row} outside the cache's {self.slots} slots")
        self._row, self._lengths = row, None

    def decode(self, lengths: torch.Tensor) -> None:
        """The next forward pass writes one token per row 0..n-1, row i at slot lengths[i]."""
        n = lengths.shape[0]
        if n > self.slots or int(lengths.max()) >= self.max_len:
            raise ValueError(f"decode of {n} rows up to slot {int(lengths.max())} does not fit "
                             f"{self.slots} rows x {self.max_len} slots")
        self._row, self._lengths, self._n = None, lengths, n
        self._rows = torch.arange(n, device=lengths.device)
        self._width = int(lengths.max()) + 1

    def update(self, layer: int, first: torch.Tensor, second: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        """Write this step's entries (k and v, or latent and rope key: [B, ..., T, dim]); return each buffer's
        rows up to the longest length, as `KVCache.update` returns the slots so far."""
        return (self._write(self.buffers[0][layer], first, start), self._write(self.buffers[1][layer], second, start))

    def _write(self, buf: torch.Tensor, x: torch.Tensor, start: int) -> torch.Tensor:
        t = buf.dim() - 2  # the time axis of [slots, ..., T, dim]
        if self._lengths is not None:  # decode: one new entry per row, each at its own slot
            n = x.shape[0]
            buf.movedim(t, 1)[self._rows, self._lengths] = x.movedim(t, 1)[:, 0]
            return buf[:n].narrow(t, 0, self._width)
        if self._row is None:
            raise RuntimeError("SlotCache: call prefill(row) or decode(lengths) before a forward pass")
        end = start + x.shape[t]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        row = buf[self._row:self._row + 1]
        row.narrow(t, start, end - start).copy_(x)
        return row.narrow(t, 0, end)

    def joint(self, layer: int, end: int) -> torch.Tensor:
        """MLA decode reads [latent; rope key] of slots 0..end-1 in place, for the rows the last update wrote."""
        buf = self.storage[0][layer]
        rows = buf[:self._n] if self._lengths is not None else buf[self._row:self._row + 1]
        return rows[:, :end]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` slots of row `src` into row `dst` (to keep active rows contiguous)."""
        for buf in self.storage:
            t = buf.dim() - 3  # the time axis of buf[:, row]: [layers, ..., T, dim]
            buf[:, dst].narrow(t, 0, length).copy_(buf[:, src].narrow(t, 0, length))


def decode_mask(lengths: torch.Tensor) -> torch.Tensor:
    """[n, 1, 1, S] bool: row i's new token (written at slot lengths[i]) sees slots 0..lengths[i]."""
    width = int(lengths.max()) + 1
    return (torch.arange(width, device=lengths.device)[None, :] <= lengths[:, None])[:, None, None, :]
