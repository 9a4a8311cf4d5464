"""One Transformer layer (`Block`): self-attention, optional cross-attention, feed-forward, norms."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.attention import Attention, KVCache
from lmforge.model.config import ModelConfig
from lmforge.model.layers import MLP, deepnorm_constants, make_norm
from lmforge.model.mla import MLA
from lmforge.model.moe import MoE, is_moe_layer


def make_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The attention sublayer of block `layer_idx` (the seam where attention variants plug in)."""
    if cfg.attention == "mla":
        return MLA(cfg, layer_idx)
    return Attention(cfg, layer_idx)


def make_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The feed-forward sublayer of block `layer_idx` (the seam where MoE layers plug in): an MoE past
    the first `moe_first_dense` blocks when `moe_experts` > 0, else the dense MLP."""
    if is_moe_layer(cfg, layer_idx):
        return MoE(cfg)
    return MLP(cfg)


class Block(nn.Module):
    """One layer: self-attention, cross-attention over an encoder's memory (`cross`, encoder-decoder
    decoders only), feed-forward. With f a sublayer and N a norm, `cfg.norm_placement` gives
    pre: x + f(N(x)); post: N(x + f(x)); sandwich: x + N'(f(N(x))) (CogView, Ding et al. 2021);
    deepnorm: N(alpha x + f(x)) (Wang et al. 2022, eq. 1), `role` picking its alpha."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, cross: bool = False, role: str = "decoder-only") -> None:
        super().__init__()
        self.placement = cfg.norm_placement
        self.alpha = deepnorm_constants(cfg, role)[0] if self.placement == "deepnorm" else 1.0
        sandwich = self.placement == "sandwich"
        self.attn_norm = make_norm(cfg)
        self.attn = make_attention(cfg, layer_idx)
        self.attn_post_norm = make_norm(cfg) if sandwich else None
        self.cross_norm = make_norm(cfg) if cross else None
        self.cross_attn = Attention(cfg, layer_idx, cross=True) if cross else None
        self.cross_post_norm = make_norm(cfg) if cross and sandwich else None
        self.mlp_norm = make_norm(cfg)
        self.mlp = make_ffn(cfg, layer_idx)
        self.mlp_post_norm = make_norm(cfg) if sandwich else None
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def _residual(self, x: torch.Tensor, f, norm: nn.Module, post_norm: nn.Module | None,
                  dropout: bool) -> torch.Tensor:
        drop = self.resid_dropout if dropout else (lambda h: h)  # the MLP applies its own dropout
        if self.placement == "pre":
            return x + drop(f(norm(x)))
        if self.placement == "sandwich":
            return x + drop(post_norm(f(norm(x))))
        return norm(self.alpha * x + drop(f(x)))  # post (alpha = 1) and deepnorm

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, start_pos: int, attn_mask: torch.Tensor | None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                memory: tuple[torch.Tensor, torch.Tensor] | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`memory`: this layer's cross-attention K/V (`Attention.memory_kv` of the encoder output)."""
        x = self._residual(x, lambda h: self.attn(h, rope, cache, start_pos, attn_mask, prefix),
                           self.attn_norm, self.attn_post_norm, True)
        if self.cross_attn is not None:
            x = self._residual(x, lambda h: self.cross_attn.cross(h, memory, memory_mask),
                               self.cross_norm, self.cross_post_norm, True)
        return self._residual(x, self.mlp, self.mlp_norm, self.mlp_post_norm, False)

    @torch.no_grad()
    def deepnorm_init(self, beta: float) -> None:
        """DeepNorm init (Wang et al. 2022, sec. 3): Xavier-normal weights, with gain beta on the value,
        output and feed-forward projections (q and k keep gain 1)."""
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear) or name.endswith("norm"):
                continue
            nn.init.xavier_normal_(module.weight, gain=1.0 if name.endswith(("attn.qkv", "attn.q", "kv")) else beta)
            if name.endswith("attn.qkv"):  # the value rows of the fused projection
                v = module.weight[-self.attn.n_kv_heads * self.attn.head_dim:]
                nn.init.xavier_normal_(v, gain=beta)
            elif name.endswith("attn.kv"):
                v = module.weight[module.weight.shape[0] // 2:]
                nn.init.xavier_normal_(v, gain=beta)
