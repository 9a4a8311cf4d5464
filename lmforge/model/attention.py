"""Multi-head attention with grouped KV heads (MHA / GQA / MQA) on PyTorch's fused SDPA, and the KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.positions import apply_rope


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

    def bytes_per_token(self) -> int:
        layers, batch, heads, _, dim = self.k.shape
        return 2 * layers * heads * dim * self.k.element_size()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.use_rope = cfg.position == "rope"
        self.dropout = cfg.dropout
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.bias or cfg.qkv_bias)  # rows [q; k; v]
        self.out = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, start_pos: int = 0,
                attn_mask: torch.Tensor | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`attn_mask` (bool, True = may attend, broadcastable to [B, H, T, S]) replaces the causal
        mask when given; the engine uses it for left-padded batches.

        `prefix` ([B, KV, P, D] keys and values, prefix tuning) goes in front of this chunk's keys, as P
        cached positions would: the chunk starts at `start_pos` = P, and a cache is written from slot 0."""
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, KV * D, KV * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, KV, D).transpose(1, 2)
        v = v.view(B, T, KV, D).transpose(1, 2)
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
                attn_mask = (torch.arange(S, device=x.device)[None, :]
                             <= (start_pos + torch.arange(T, device=x.device))[:, None])
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=KV != H,
        )
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))
