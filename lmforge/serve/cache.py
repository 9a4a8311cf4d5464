"""A KV cache with one row ("slot") per running request, each at its own length, and a prefix cache of KV blocks.

`lmforge.model.attention.KVCache` (and MLA's `LatentCache`) write every row of a batch at the same
position, which suits a batch that starts together. Continuous batching does not: requests join and leave
between steps, so each row has its own length. `SlotCache` keeps the same `update(layer, k, v, start)`
contract the attention layers call; before each forward pass the scheduler says which rows it covers:

- `extend(rows, starts, counts)`: the forward pass is a [n, T] batch; batch entry i is cache row rows[i],
  and its first counts[i] tokens are written at slots starts[i].. (the rest of its T columns is padding,
  never written). Attention reads each row's keys up to the longest end; the caller masks keys past each
  row's own query (`extend_mask`). A decode step is the case T = 1 over rows 0..n-1 (`decode`); a prompt,
  a chunk of one, or several prompts prefilled together are the other cases.

Active requests always occupy rows 0..n-1 (`move` fills the hole a finished request leaves), so a decode
step over every row reads a view of the cache, never a gathered copy; other row sets are gathered.

`PrefixCache` keeps the keys and values of full prompt blocks (`BLOCK` tokens) after their request has
gone: block i of a prompt is found by (its parent block, its tokens), as vLLM's automatic prefix caching
hashes blocks, so a block matches only when every token before it matches too. A new request copies its
longest cached run of blocks into its row and prefills only the rest. Exact: the keys and values of a
position depend on the tokens up to it only (causal attention), so the copied blocks are the ones the
request would compute itself. Blocks are copied into the request's row rather than shared in place (this
cache is contiguous per row, not paged), so a block is never pinned by a running request and eviction is
plain LRU over blocks without cached children.

`SourceCache` is an encoder-decoder's second cache: each slot's cross-attention keys and values of its
request's encoded source, computed once at admission, beside the decoder's self-attention KV in `SlotCache`.
A pass over several rows reads their sources up to the longest one, with a [n, S] mask hiding each shorter
source's padding.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

BLOCK = 16  # tokens per prefix-cache block


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
        self._rows: torch.Tensor | None = None  # [n] the cache row of each batch entry
        self._contiguous = False  # rows are 0..n-1: read a view instead of a gathered copy
        self._write_at: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._width = 0

    def extend(self, rows: list[int], starts: list[int], counts: list[int]) -> None:
        """The next forward pass is a [len(rows), max(counts)] batch: entry i writes its first counts[i] tokens
        into row rows[i] from slot starts[i] on."""
        ends = [s + c for s, c in zip(starts, counts)]
        if not rows or min(counts) < 1 or max(rows) >= self.slots or min(rows) < 0 or max(ends) > self.max_len:
            raise ValueError(f"extend of rows {rows} to slots {ends} does not fit "
                             f"{self.slots} rows x {self.max_len} slots")
        device = self.storage[0].device
        entry = [i for i, c in enumerate(counts) for _ in range(c)]
        column = [q for c in counts for q in range(c)]
        slot = [s + q for s, c in zip(starts, counts) for q in range(c)]
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        self._rows = as_t(rows)
        self._write_at = (as_t([rows[i] for i in entry]), as_t(slot), as_t(entry), as_t(column))
        self._contiguous = rows == list(range(len(rows)))
        self._width = max(ends)

    def decode(self, lengths: torch.Tensor) -> None:
        """The next forward pass writes one token per row 0..n-1, row i at slot lengths[i]."""
        n = lengths.shape[0]
        self.extend(list(range(n)), lengths.tolist(), [1] * n)

    def update(self, layer: int, first: torch.Tensor, second: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        """Write this step's entries (k and v, or latent and rope key: [B, ..., T, dim]); return each buffer's
        rows up to the longest end, as `KVCache.update` returns the slots so far."""
        return (self._write(self.buffers[0][layer], first), self._write(self.buffers[1][layer], second))

    def _write(self, buf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self._write_at is None:
            raise RuntimeError("SlotCache: call extend(...) or decode(lengths) before a forward pass")
        t = buf.dim() - 2  # the time axis of [slots, ..., T, dim]
        rows, slots, entries, columns = self._write_at
        buf.movedim(t, 1)[rows, slots] = x.movedim(t, 1)[entries, columns].to(buf.dtype)
        return self._read(buf).narrow(t, 0, self._width)

    def _read(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[:len(self._rows)] if self._contiguous else buf[self._rows]

    def joint(self, layer: int, end: int) -> torch.Tensor:
        """MLA decode reads [latent; rope key] of slots 0..end-1 for the rows the last update wrote."""
        return self._read(self.storage[0][layer])[:, :end]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` slots of row `src` into row `dst` (to keep active rows contiguous)."""
        for buf in self.storage:
            t = buf.dim() - 3  # the time axis of buf[:, row]: [layers, ..., T, dim]
            buf[:, dst].narrow(t, 0, length).copy_(buf[:, src].narrow(t, 0, length))


def extend_mask(starts: list[int], counts: list[int], device: torch.device, window: int = 0) -> torch.Tensor:
    """[n, 1, T, S] bool for an `extend` batch: entry i's query q (at slot starts[i] + q) sees slots up to its
    own (the last `window` of them, when > 0); padded queries (q >= counts[i]) see slot 0 only (their outputs
    are dropped)."""
    T, S = max(counts), max(s + c for s, c in zip(starts, counts))
    first = torch.tensor(starts, device=device)[:, None, None]
    q = torch.arange(T, device=device)[None, :, None]
    k = torch.arange(S, device=device)[None, None, :]
    real = q < torch.tensor(counts, device=device)[:, None, None]
    seen = k <= first + q
    if window:
        seen = seen & (first + q - k < window)
    return (seen & real | (k == 0) & ~real)[:, None]


@dataclass
class _Block:
    serial: int  # never reused, so a child's key never points at a later block that took its parent's place
    slot: int  # where its keys and values sit in the pool
    parent: _Block | None
    key: tuple
    children: int = 0


class PrefixCache:
    """Keys and values of up to `capacity` full prompt blocks, looked up by (parent block, tokens), LRU-evicted."""

    def __init__(self, slots: SlotCache, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a prefix cache needs at least one block, got {capacity}")
        self.slots, self.capacity = slots, capacity
        # pool buffers: the slot cache's storage with rows -> blocks and time -> BLOCK
        self.pool = [buf.new_zeros(buf.shape[0], capacity, *buf.shape[2:-2], BLOCK, buf.shape[-1])
                     for buf in slots.storage]
        self.blocks: OrderedDict[tuple, _Block] = OrderedDict()  # least recently used first
        self.free = list(range(capacity))
        self._serial = itertools.count(1)
        self.hits = self.misses = 0  # blocks found / not found by `lookup`

    def _key(self, parent: _Block | None, tokens: list[int], root: object) -> tuple:
        return (parent.serial if parent is not None else ("root", root), tuple(tokens))

    def match(self, tokens: list[int], root: object = None) -> list[_Block]:
        """The cached blocks that start `tokens`, in order (touched, so they are evicted last)."""
        found: list[_Block] = []
        for i in range(len(tokens) // BLOCK):
            block = self.blocks.get(self._key(found[-1] if found else None, tokens[i * BLOCK:(i + 1) * BLOCK], root))
            if block is None:
                break
            self.blocks.move_to_end(block.key)
            found.append(block)
        return found

    def load(self, blocks: list[_Block], row: int) -> None:
        """Copy `blocks` into slots 0..len(blocks) * BLOCK - 1 of cache row `row`."""
        if not blocks:
            return
        ids = torch.tensor([b.slot for b in blocks], device=self.pool[0].device)
        for pool, buf in zip(self.pool, self.slots.storage):
            run = pool[:, ids].movedim(1, -3)  # [layers, ..., n, BLOCK, dim]
            run = run.reshape(*run.shape[:-3], len(blocks) * BLOCK, run.shape[-1])
            buf[:, row].narrow(-2, 0, run.shape[-2]).copy_(run)

    def store(self, tokens: list[int], row: int, root: object = None) -> None:
        """Keep the full blocks of `tokens` (whose keys and values fill slots 0.. of row `row`)."""
        parent: _Block | None = None
        for i in range(len(tokens) // BLOCK):
            key = self._key(parent, tokens[i * BLOCK:(i + 1) * BLOCK], root)
            block = self.blocks.get(key)
            if block is None:
                slot = self._allocate(keep=parent)
                if slot is None:
                    return
                for pool, buf in zip(self.pool, self.slots.storage):
                    pool[:, slot].copy_(buf[:, row].narrow(-2, i * BLOCK, BLOCK))
                block = _Block(next(self._serial), slot, parent, key)
                self.blocks[key] = block
                if parent is not None:
                    parent.children += 1
            else:
                self.blocks.move_to_end(key)
            parent = block

    def _allocate(self, keep: _Block | None) -> int | None:
        """A free pool slot, evicting the least recently used leaf block if none is free (never `keep`)."""
        if self.free:
            return self.free.pop()
        for key, block in self.blocks.items():
            if block.children == 0 and block is not keep:
                del self.blocks[key]
                if block.parent is not None:
                    block.parent.children -= 1
                return block.slot
        return None


class SourceCache:
    """Per-slot cross-attention K/V of encoded sources: every decoder layer's [slots, KV heads, max_len, dim] keys
    and values, and each slot's source length. Buffers are made at the first `put` (their shape is the model's)."""

    def __init__(self, slots: int, max_len: int) -> None:
        self.slots, self.max_len = slots, max_len
        self.k: torch.Tensor | None = None  # [layers, slots, KV, max_len, dim]
        self.v: torch.Tensor | None = None
        self.lengths = [0] * slots

    def put(self, row: int, memory: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep one source's per-layer (k, v) [1, KV, S, dim] in slot `row`."""
        k0 = memory[0][0]
        S = k0.shape[-2]
        if S > self.max_len:
            raise ValueError(f"a source of {S} tokens does not fit {self.max_len} slots")
        if self.k is None:
            shape = (len(memory), self.slots, k0.shape[1], self.max_len, k0.shape[-1])
            self.k, self.v = k0.new_zeros(shape), k0.new_zeros(shape)
        for layer, (k, v) in enumerate(memory):
            self.k[layer, row, :, :S] = k[0]
            self.v[layer, row, :, :S] = v[0]
        self.lengths[row] = S

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s source into row `dst` (the scheduler keeps running rows contiguous)."""
        S = self.lengths[dst] = self.lengths[src]
        for buf in (self.k, self.v):
            buf[:, dst, :, :S] = buf[:, src, :, :S]

    def read(self, rows: list[int]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """The sources of `rows` as per-layer (k, v) [n, KV, S, dim] (S: the longest of them) and the [n, S] mask
        of real source tokens (None when every source is S long)."""
        lengths = [self.lengths[r] for r in rows]
        S = max(lengths)
        if rows == list(range(len(rows))):
            k, v = self.k[:, :len(rows), :, :S], self.v[:, :len(rows), :, :S]
        else:
            index = torch.tensor(rows, device=self.k.device)
            k, v = self.k[:, index, :, :S], self.v[:, index, :, :S]
        mask = None
        if min(lengths) < S:
            mask = torch.arange(S, device=self.k.device)[None, :] < torch.tensor(lengths, device=self.k.device)[:, None]
        return list(zip(k.unbind(0), v.unbind(0))), mask
