"""What a config costs: exact parameter counts, parameters active per token (MoE), training FLOPs per token."""

from __future__ import annotations

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.moe import is_moe_layer
from lmforge.model.transformer import Transformer


def num_params(cfg: ModelConfig, include_embeddings: bool = True) -> int:
    """Exact parameter count, from a model built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    if not include_embeddings:
        total -= sum(p.numel() for n, p in model.named_parameters() if n in ("embed.weight", "lm_head.weight",
                                                                            "pos_embed.weight"))
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (non-embedding params + lm head) plus attention scores."""
    dense = num_params(cfg, include_embeddings=False) + cfg.vocab_size * cfg.d_model
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len / 2  # causal: half the matrix
    if cfg.moe_experts:  # a token runs top_k of the routed experts only

        dense -= num_params(cfg) - active_params(cfg)
    if cfg.attention == "mla":  # scores over qk_nope + qk_rope dims, values of v_head_dim
        per_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
        attn = 6 * cfg.n_layers * cfg.n_heads * per_head * seq_len / 2
    return 6 * dense + attn


def active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses: the total minus the E - K routed experts each MoE layer skips for it."""
    n_moe = sum(is_moe_layer(cfg, i) for i in range(cfg.n_layers + cfg.mtp_depth))
    skipped = (cfg.moe_experts - cfg.moe_top_k) * 3 * cfg.d_model * cfg.moe_d_ff if cfg.moe_experts else 0
    return num_params(cfg) - n_moe * skipped
