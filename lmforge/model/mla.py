"""Multi-head latent attention (DeepSeek-V2 section 2.1, used unchanged by DeepSeek-V3) and its latent cache.

Keys and values are rebuilt from one low-rank latent c_kv = RMSNorm(W_dkv x) (eq. 9-11); RoPE cannot pass
through that compression, so a small decoupled key k_rope = RoPE(W_kr x), shared by all heads, carries the
positions (eq. 14-19). Only c_kv and k_rope are cached: (kv_lora_rank + qk_rope_head_dim) numbers per token
and layer, against 2 * kv_heads * head_dim for GQA. One-token decode steps never expand the cache: W_uk is
absorbed into the query and W_uv applied after attention (section 2.1.2), so they attend over the latent
directly as single-KV-head attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.layers import RMSNorm
from lmforge.model.positions import apply_rope, yarn_mscale

LATENT_NORM_EPS = 1e-6  # DeepSeek's q/kv latent norms use their default eps, not the model's norm_eps


class LatentCache:
    """Preallocated MLA cache, one buffer `kv` [layers, batch, max_len, kv_lora_rank + qk_rope_head_dim] holding
    each token's latent then its RoPE key (`latent` and `rope_key` are views). Same `update` contract as
    `KVCache` (write at `start`, return everything so far); decode steps read `joint` as one KV head."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.rank = cfg.kv_lora_rank
        self.kv = torch.zeros(cfg.n_layers, batch_size, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                              dtype=dtype, device=device)
        self.max_len = max_len

    @property
    def latent(self) -> torch.Tensor:
        return self.kv[..., : self.rank]

    @property
    def rope_key(self) -> torch.Tensor:
        return self.kv[..., self.rank:]

    def update(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor, start: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [B, T, r], rope_key [B, T, dr] written at slots start..start+T-1; returns slots 0..end-1."""
        end = start + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"latent cache holds {self.max_len} positions; asked to write up to {end}")
        self.kv[layer, :, start:end, : self.rank] = latent
        self.kv[layer, :, start:end, self.rank:] = rope_key
        joint = self.kv[layer, :, :end]
        return joint[..., : self.rank], joint[..., self.rank:]

    def joint(self, layer: int, end: int) -> torch.Tensor:
        """[B, end, r + dr]: [latent; rope key] of slots 0..end-1 (no copy)."""
        return self.kv[layer, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes old row rows[i] (`KVCache.reorder`)."""
        self.kv.copy_(self.kv.index_select(1, rows))

    def copy_slot(self, dst: int, src: int) -> None:
        """Slot `src` written to slot `dst` (`KVCache.copy_slot`)."""
        self.kv[:, :, dst] = self.kv[:, :, src]

    def bytes_per_token(self) -> int:
        layers, _, _, width = self.kv.shape
        return layers * width * self.kv.element_size()


def mla_cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Cache bytes per token of `cfg` for MLA (latent + rope key) or MHA/GQA (keys + values)."""
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.attention == "mla"
                 else 2 * cfg.n_kv_heads * cfg.head_dim)
    return cfg.n_layers * per_layer * torch.empty(0, dtype=dtype).element_size()


def deepseek_yarn_scales(cfg: ModelConfig, scale: float) -> tuple[float, float]:
    """(softmax scale, factor on the rotated queries) for DeepSeek's YaRN (HF `yarn_apply_mscale` and yarn's
    attention_factor): with mscale_all_dim the whole softmax is scaled by m(s, mscale_all_dim)^2, and with
    both mscale and mscale_all_dim RoPE's cos/sin carry m(s, mscale) / m(s, mscale_all_dim) instead of the
    m(s) the shared RoPE tables hold, so the rotated q.k is corrected by that ratio squared."""
    s = cfg.rope_factor

    def m(mscale: float) -> float:
        return 0.1 * mscale * math.log(s) + 1.0 if s > 1 else 1.0

    fix = 1.0
    if cfg.mla_mscale and cfg.mla_mscale_all_dim:
        fix = (m(cfg.mla_mscale) / m(cfg.mla_mscale_all_dim) / yarn_mscale(s)) ** 2
    if cfg.mla_mscale_all_dim:
        scale *= m(cfg.mla_mscale_all_dim) ** 2
    return scale, fix


def offset_causal_mask(T: int, S: int, start_pos: int, device: torch.device) -> torch.Tensor:
    """[T, S] bool: query t (at position start_pos + t) sees keys 0..start_pos + t."""
    return torch.arange(S, device=device)[None, :] <= (start_pos + torch.arange(T, device=device))[:, None]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.r = cfg.n_heads, cfg.kv_lora_rank
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.scale, self.rope_fix = (self.dn + self.dr) ** -0.5, 1.0
        if cfg.rope_scaling == "yarn":
            self.scale, self.rope_fix = deepseek_yarn_scales(cfg, self.scale)
        self.dropout = cfg.dropout
        q_out = self.H * (self.dn + self.dr)
        if cfg.q_lora_rank:  # queries through their own low-rank bottleneck (eq. 12-13): less activation memory
            self.q_a = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=cfg.bias)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        else:
            self.q = nn.Linear(cfg.d_model, q_out, bias=False)
        self.kv_a = nn.Linear(cfg.d_model, self.r + self.dr, bias=cfg.bias)  # rows [W_dkv; W_kr]
        self.kv_norm = RMSNorm(self.r, LATENT_NORM_EPS)
        self.kv_b = nn.Linear(self.r, self.H * (self.dn + self.dv), bias=False)  # per head rows [W_uk; W_uv]
        self.out = nn.Linear(self.H * self.dv, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: LatentCache | None = None, start_pos: int = 0, attn_mask: torch.Tensor | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Same contract as `Attention.forward`; prefix tuning (per-layer K/V) has no latent form and raises."""
        if prefix is not None:
            raise LmforgeError("prefix tuning is not supported with model.attention='mla' (use prompt tuning or LoRA)")
        B, T, _ = x.shape
        H, dn, dr = self.H, self.dn, self.dr
        q = self.q_b(self.q_norm(self.q_a(x))) if hasattr(self, "q_a") else self.q(x)
        q_nope, q_rope = q.view(B, T, H, dn + dr).transpose(1, 2).split([dn, dr], dim=-1)
        latent, k_rope = self.kv_a(x).split([self.r, dr], dim=-1)
        latent, k_rope = self.kv_norm(latent), k_rope[:, None]  # k_rope: one head shared by all [B, 1, T, dr]
        if rope is not None:
            q_rope, k_rope = apply_rope(q_rope, *rope), apply_rope(k_rope, *rope)
            if self.rope_fix != 1.0:
                q_rope = q_rope * self.rope_fix
        if cache is not None:
            latent, k_rope = cache.update(self.layer_idx, latent, k_rope[:, 0], start_pos)
            k_rope = k_rope[:, None]
        S = latent.shape[1]
        is_causal = attn_mask is None and T > 1 and S == T
        if attn_mask is None and T > 1 and S != T:
            attn_mask = offset_causal_mask(T, S, start_pos, x.device)
        if cache is not None and T == 1 and not self.training:
            y = self._absorbed(q_nope, q_rope, cache.joint(self.layer_idx, S), attn_mask)
        else:
            kv = self.kv_b(latent).view(B, S, H, dn + self.dv).transpose(1, 2)
            k_nope, v = kv.split([dn, self.dv], dim=-1)
            k = torch.cat([k_nope, k_rope.expand(B, H, S, dr)], dim=-1)
            y = F.scaled_dot_product_attention(torch.cat([q_nope, q_rope], dim=-1), k, v, attn_mask=attn_mask,
                                               is_causal=is_causal, scale=self.scale,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, H * self.dv))

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, joint: torch.Tensor,
                  attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention in latent space: q_nope W_uk^T . c == q_nope . (W_uk c), and (p . c) W_uv^T == p . (c W_uv^T),
        so keys [c; k_rope] (`joint` [B, S, r + dr], read in place from the cache) and values c form one KV head."""
        w = self.kv_b.weight.view(self.H, self.dn + self.dv, self.r)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        k = joint[:, None]  # [B, 1, S, r + dr]
        o = F.scaled_dot_product_attention(torch.cat([q_lat, q_rope], dim=-1), k, k[..., : self.r],
                                           attn_mask=attn_mask, scale=self.scale, enable_gqa=True)
        return torch.einsum("bhtr,hvr->bhtv", o, w_uv)
