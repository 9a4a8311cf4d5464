"""Multi-head attention with grouped KV heads (MHA / GQA / MQA) on PyTorch's fused SDPA, and the KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.positions import alibi_bias, apply_rope


class KVCache:
    """Preallocated keys and values of every layer, [layers, batch, kv_heads, max_len, head_dim].

    Decoding writes each step's keys in place instead of concatenating, so memory is fixed
    up front and no step allocates (nanochat's engine does the same).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes old row rows[i] (beam search keeps the beams it extends)."""
        self.k.copy_(self.k.index_select(1, rows))
        self.v.copy_(self.v.index_select(1, rows))

    def copy_slot(self, dst: int, src: int) -> None:
        """Every layer's and row's slot `src` written to slot `dst` (contrastive search keeps its pick)."""
        self.k[:, :, :, dst] = self.k[:, :, :, src]
        self.v[:, :, :, dst] = self.v[:, :, :, src]

    def bytes_per_token(self) -> int:
        layers, batch, heads, _, dim = self.k.shape
        return 2 * layers * heads * dim * self.k.element_size()


def attention_mask(T: int, S: int, start_pos: int, device: torch.device, *, causal: bool = True,
                   window: int = 0, prefix_len: torch.Tensor | None = None,
                   base: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask [B or 1, 1, T, S] (True = may attend) for T queries at slots start_pos.. over S key slots.

    `base` (a caller's mask, e.g. left padding) replaces the causal rule. `prefix_len` ([B] slots) opens
    the keys before it to every query: bidirectional over the prefix, causal after it (prefix LM, Raffel
    et al. 2020 fig. 4; GLM; U-PaLM). `window` > 0 keeps only keys less than `window` slots away: the last
    `window` slots of a causal query, itself included (Mistral; HF: kv > q - window), and as far ahead
    for bidirectional (prefix, encoder) queries."""
    q = (start_pos + torch.arange(T, device=device))[:, None]
    k = torch.arange(S, device=device)[None, :]
    if base is not None:
        mask = base.bool()
    else:
        mask = (k <= q) if causal else torch.ones(T, S, dtype=torch.bool, device=device)
    if prefix_len is not None:
        mask = mask | (k < prefix_len.to(device)[:, None, None, None])
    if window:
        mask = mask & ((q - k).abs() < window)
    while mask.dim() < 4:
        mask = mask[None]
    return mask


def with_bias(mask: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SDPA's float mask: the additive position bias (ALiBi / T5) where allowed, -inf elsewhere."""
    if bias is None:
        return mask
    return bias.masked_fill(~mask, float("-inf"))


class Attention(nn.Module):
    """Self-attention with fused [q; k; v] rows, or (`cross=True`) attention from queries over an encoder's
    memory with [q] and fused [k; v] projections; both end in the same SDPA call and output projection."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, cross: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.use_rope = cfg.position == "rope" and not cross
        self.dropout = cfg.dropout
        self.scale = cfg.attn_scale or None  # None: SDPA's 1/sqrt(head_dim)
        bias = cfg.bias or cfg.qkv_bias
        q_out, kv_out = self.n_heads * self.head_dim, 2 * self.n_kv_heads * self.head_dim
        if cross:
            self.q = nn.Linear(cfg.d_model, q_out, bias=bias)
            self.kv = nn.Linear(cfg.d_model, kv_out, bias=bias)  # rows [k; v]
        else:
            self.qkv = nn.Linear(cfg.d_model, q_out + kv_out, bias=bias)  # rows [q; k; v]
        self.out = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                is_causal: bool) -> torch.Tensor:
        B, H, T, D = q.shape
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_heads != H,
        )
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values [B, KV, S, D] of an encoder output: computed once per source and
        reused at every decoding step (the cross K/V cache)."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)

    def cross(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries from x over the encoder memory's `kv`; `attn_mask` ([B, 1, 1, S] bool) hides source padding."""
        return self._attend(self._heads(self.q(x), self.n_heads), kv[0], kv[1], attn_mask, False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, start_pos: int = 0,
                attn_mask: torch.Tensor | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`attn_mask` (bool, True = may attend, or an additive float bias with -inf for hidden keys;
        broadcastable to [B, H, T, S]) replaces the causal mask when given: the engine passes one for
        left-padded batches, `Transformer` for windows, prefixes and ALiBi/T5 biases.

        `prefix` ([B, KV, P, D] keys and values, prefix tuning) goes in front of this chunk's keys, as P
        cached positions would: the chunk starts at `start_pos` = P, and a cache is written from slot 0."""
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, KV * D, KV * D], dim=-1)
        q, k, v = self._heads(q, H), self._heads(k, KV), self._heads(v, KV)
        if self.use_rope and rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if prefix is not None:
            k, v = torch.cat([prefix[0].to(k.dtype), k], dim=2), torch.cat([prefix[1].to(v.dtype), v], dim=2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, start_pos - (0 if prefix is None else prefix[0].shape[2]))
        S = k.shape[2]
        is_causal = False
        if attn_mask is None and T > 1:
            if S == T:
                is_causal = True
            else:  # a chunk appended after cached positions: causal with an offset
                attn_mask = attention_mask(T, S, start_pos, x.device)
        return self._attend(q, k, v, attn_mask, is_causal)


def self_attention_mask(cfg: ModelConfig, T: int, start_pos: int, dtype: torch.dtype, device: torch.device, *,
                        causal: bool = True, base: torch.Tensor | None = None,
                        prefix_len: torch.Tensor | None = None, alibi: torch.Tensor | None = None,
                        rel_bias: nn.Module | None = None) -> torch.Tensor | None:
    """The mask every self-attention layer of a stack shares, T queries after start_pos cached slots: None
    (SDPA's own causal path) unless a caller mask, a prefix, a sliding window that bites, ALiBi slopes or a
    T5 relative bias asks for more; then `attention_mask`, with the position bias folded in."""
    S = start_pos + T
    windowed = bool(cfg.sliding_window) and S > cfg.sliding_window
    if alibi is None and rel_bias is None and prefix_len is None and not windowed and (causal or base is not None):
        return base
    mask = attention_mask(T, S, start_pos, device, causal=causal, window=cfg.sliding_window if windowed else 0,
                          prefix_len=prefix_len, base=base)
    q, k = start_pos + torch.arange(T, device=device), torch.arange(S, device=device)
    bias = alibi_bias(alibi, q, k) if alibi is not None else rel_bias(q, k) if rel_bias is not None else None
    return with_bias(mask, None if bias is None else bias.to(dtype))
