"""Static-shape decoding: one token per step over the whole preallocated KV cache, for CUDA graphs.

At small model sizes batch-1 decode is bound by Python and kernel-launch overhead, not by the GPU. The
normal engine's step slices the cache to the current length, so every step has a new shape and cannot be
captured once. Here a step always attends over all `max_len` cache slots, hiding the unwritten ones with a
length mask (key slot <= position), and takes its position as a tensor; every step then has the same
shapes, and `torch.compile(mode="reduce-overhead")` records it once as a CUDA graph and replays it
(gpt-fast's recipe). Masked slots get zero attention weight, so the tokens match the normal engine. On
CPU the step is compiled by inductor without CUDA graphs (default mode): its C++ kernels fuse the step's small
element-wise ops and drop most per-op dispatch, which is what batch-1 decode of a small model spends its time on;
the first call compiles (a minute or more on a small or busy machine; later processes reuse inductor's cache).

The prompt is prefilled eagerly through the model's ordinary forward into the same cache. Only plain
decoder-only models qualify (`static_supported`): multi-head / grouped-query attention with RoPE,
learned, sinusoidal or no positions, and nothing whose shapes or control flow depend on data (MoE routing,
MLA, sliding windows, ALiBi/T5 biases, dynamic-NTK RoPE, prefix/prompt tuning).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmforge.model.attention import KVCache
from lmforge.model.transformer import Transformer

WINDOW_STEP = 32  # a CPU step attends over the slots written so far, rounded up to a multiple of this


class StaticKVCache(KVCache):
    """A `KVCache` with one key and one value tensor per layer ([B, KV, max_len, D] each) that, given a tensor
    position, writes one slot in place and returns every slot of that layer.

    Separate per-layer tensors, not views of one [layers, ...] tensor: inductor then writes a step's keys into
    the cache in place (an index_put on a graph input). A write into a view of one shared tensor is
    functionalized into a copy of the whole cache every step (16 MB a token for the 34M benchmark model, more
    than the step's attention reads). With an int `start` (the eager prefill) it behaves like `KVCache`."""

    def __init__(self, cfg, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               start: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.k[layer], self.v[layer]
        if not isinstance(start, torch.Tensor):
            end = start + k.shape[2]
            if end > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
            ck[:, :, start:end], cv[:, :, start:end] = k, v
            return ck[:, :, :end], cv[:, :, :end]
        ck[:, :, start] = k
        cv[:, :, start] = v
        return ck, cv

    def bytes_per_token(self) -> int:
        batch, heads, _, dim = self.k[0].shape
        return 2 * len(self.k) * heads * dim * self.k[0].element_size()


class CacheWindow:
    """The first `length` slots of a `StaticKVCache`: a step writes its slot as the cache does and attends over
    these slots only (a CPU step then reads the keys written so far, rounded up, not the whole cache)."""

    def __init__(self, cache: StaticKVCache, length: int | torch.SymInt) -> None:
        self.cache, self.length = cache, length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.cache.update(layer, k, v, start)
        return ck[:, :, :self.length], cv[:, :, :self.length]


def static_supported(model: nn.Module) -> str | None:
    """None when `model` can decode with static shapes, else the reason it cannot (one line)."""
    if not isinstance(model, Transformer):
        return f"{type(model).__name__} is not a decoder-only lmforge Transformer"
    cfg = model.cfg
    reasons = {
        "attention is MLA": cfg.attention == "mla",
        "MoE layers route tokens data-dependently": cfg.moe_experts > 0,
        f"position '{cfg.position}' adds a per-step bias": cfg.position not in ("rope", "learned", "sinusoidal",
                                                                                  "none"),
        "dynamic-NTK RoPE recomputes its tables from the data": cfg.rope_scaling == "dynamic",
        "sliding-window attention": bool(cfg.sliding_window),
        "virtual tokens (prompt/prefix tuning)": model.virtual_tokens is not None,
        "a prefix LM prefills its prompt bidirectionally": cfg.prefix_lm,
    }
    return next((r for r, bad in reasons.items() if bad), None)


class StaticDecoder(nn.Module):
    """Batch-1 decode step of `model` with fixed shapes: `forward(token [1, 1], pos [1]) -> logits [1, V]`.

    Owns a `StaticKVCache` of `model.context_length` slots (registered as buffers, so CUDA graphs treat
    them as static memory updated in place); `prefill` fills it from a prompt and returns the last
    position's logits. The cache is reused across calls: slots past the current position are masked.

    `forward(token, pos, window)` attends over the first `window.shape[0]` slots only (`window`: those slot
    numbers, `window_for`), a size compiled as dynamic: the CPU step reads the keys written so far (rounded up
    to `WINDOW_STEP`) instead of all `context_length` slots, one graph for every length. CUDA graphs need one
    fixed shape, so CUDA steps attend over the whole cache."""

    def __init__(self, model: Transformer, compile: bool = False) -> None:
        super().__init__()
        reason = static_supported(model)
        if reason is not None:
            raise ValueError(f"static decoding does not support this model: {reason}")
        self.model = model
        p = model.embed.weight
        self.cache = StaticKVCache(model.cfg, 1, model.context_length, dtype=p.dtype, device=p.device)
        for i, (k, v) in enumerate(zip(self.cache.k, self.cache.v)):
            self.register_buffer(f"k{i}", k, persistent=False)
            self.register_buffer(f"v{i}", v, persistent=False)
        self.register_buffer("slots", torch.arange(model.context_length, device=p.device), persistent=False)
        self.step = self.forward
        self.in_use = False  # set while a stream decodes through this cache (see engine.decode_static)
        if compile:  # CUDA: recorded once as a CUDA graph; CPU: inductor's fused C++ kernels, no graphs
            mode = "reduce-overhead" if p.device.type == "cuda" else None
            self.step = torch.compile(self.forward, mode=mode, fullgraph=True)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run the prompt [1, T] through the ordinary forward into this cache; logits of its last token."""
        return self.model(prompt, cache=self.cache, start_pos=0)[:, -1]

    def window_for(self, pos: int) -> torch.Tensor | None:
        """The `window` argument of a step at position `pos`: None (the whole cache) on CUDA."""
        if self.slots.device.type == "cuda":
            return None
        window = self.slots[:min(len(self.slots), (pos // WINDOW_STEP + 1) * WINDOW_STEP)]
        torch._dynamo.maybe_mark_dynamic(window, 0)  # one graph for every window length, not one per length
        return window

    @torch.no_grad()
    def forward(self, token: torch.Tensor, pos: torch.Tensor, window: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [1, V] of `token` ([1, 1]) at position `pos` ([1], long), its K/V written at slot `pos`,
        attending over the slots of `window` (their numbers, a prefix of the cache; None: all)."""
        m, cfg = self.model, self.model.cfg
        x = m.embed(token)
        if cfg.position == "learned":
            x = x + m.pos_embed(pos)
        elif cfg.position == "sinusoidal":
            x = x + m.pos_table[pos].to(x.dtype)
        rope = m.rope(pos) if m.rope is not None else None
        slots = self.slots if window is None else window
        cache = self.cache if window is None else CacheWindow(self.cache, window.shape[0])
        mask = (slots <= pos)[None, None, None, :]  # [1, 1, 1, S]: written slots only
        # attention as plain matmuls + softmax: for one query, SDPA's CPU flash kernel spends more on its
        # blocking than on the arithmetic (~0.7 ms a layer over 512 slots); inductor fuses the math version
        with sdpa_kernel(SDPBackend.MATH):
            for block in m.blocks:
                x = block(x, rope, cache, pos, mask)
        h = m.norm(x)
        if cfg.output_scale != 1.0:
            h = h * cfg.output_scale
        return m.lm_head(h)[:, -1]


def static_decoder(model: Transformer, compile: bool = True) -> StaticDecoder:
    """The `StaticDecoder` of `model`, built once per (model, compile) and kept while the model lives, so
    the compiled graph and its CUDA-graph recording are reused across generate calls. A model moved to
    another device or dtype since gets a fresh one. Kept in the model's __dict__, not as a submodule, so
    its state_dict and parameters are unchanged."""
    per_model = model.__dict__.setdefault("_lmforge_static_decoders", {})
    p = model.embed.weight
    dec = per_model.get(compile)
    if dec is None or dec.k0.device != p.device or dec.k0.dtype != p.dtype:
        dec = per_model[compile] = StaticDecoder(model, compile)
    return dec
