"""Position encodings: rotary (RoPE), learned absolute, sinusoidal."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2 (Su et al., 2021)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables in the half-split layout LLaMA/HF use (rotate_half), so HF q/k
    weights need no permutation."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = rope_frequencies(head_dim, theta)
        t = torch.arange(max_seq_len, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for `positions` ([T] or [B, T]), shaped to broadcast over heads."""
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 1:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, D] queries or keys in x's dtype (as HF does, so bf16 runs match it)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def sinusoidal_table(max_seq_len: int, dim: int) -> torch.Tensor:
    """Fixed sin/cos absolute positions (Vaswani et al., 2017): PE[p, 2i] = sin(p / 10000^(2i/d))."""
    pos = torch.arange(max_seq_len, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_seq_len, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table.float()
