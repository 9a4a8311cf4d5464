"""The causal decoder every stage shares. Pure modules: no losses, optimizers or parallelism here."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.attention import Attention, KVCache, self_attention_mask
from lmforge.model.config import ModelConfig
from lmforge.model.layers import MLP, deepnorm_constants, make_norm
from lmforge.model.mla import MLA, LatentCache
from lmforge.model.moe import MoE, is_moe_layer
from lmforge.model.mtp import MultiTokenPrediction, aux_losses
from lmforge.model.positions import RelativePositionBias, RotaryEmbedding, alibi_slopes, sinusoidal_table


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


class Transformer(nn.Module):
    """Decoder-only Transformer: embeddings -> blocks -> final norm -> LM head.

    `virtual_tokens` (None, or a module set by `lmforge.peft` prompt/prefix tuning) adds `n_tokens`
    trainable positions in front of every sequence: `embeddings(B)` ([B, n, d] inputs, prompt tuning)
    and/or `layer_kv(B)` (per-layer [B, KV, n, D] keys and values, prefix tuning). They take positions
    0..n-1 and KV-cache slots 0..n-1; callers keep counting `start_pos` over their own tokens only, and
    outputs cover their tokens only, so training losses and generation work unchanged.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        if cfg.position == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        elif cfg.position == "alibi":
            self.register_buffer("alibi", alibi_slopes(cfg.n_heads), persistent=False)
        elif cfg.position == "t5":
            self.rel_bias = RelativePositionBias(cfg, bidirectional=False)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        # Post-norm blocks already end in a norm; pre-norm stacks need one before the head.
        self.norm = make_norm(cfg) if cfg.norm_placement in ("pre", "sandwich") else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.virtual_tokens: nn.Module | None = None
        # DeepSeek-V3 multi-token prediction modules (training aux loss, draft heads); see lmforge.model.mtp
        self.mtp = MultiTokenPrediction(cfg) if cfg.mtp_depth else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, std) everywhere, residual output projections scaled by 1/sqrt(2 * layers)."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith((".out", ".down")) else std
                nn.init.normal_(module.weight, mean=0.0, std=s)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter):
                nn.init.ones_(module.weight)  # norms
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.cfg.norm_placement == "deepnorm":
            for block in self.blocks:
                block.deepnorm_init(deepnorm_constants(self.cfg)[1])

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
                      positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                      prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, d]. `positions` ([T] or [B, T]) default to start_pos + arange(T).
        `prefix_len` ([B]) makes the model a prefix LM: tokens before it attend to each other both ways."""
        T = input_ids.shape[1]
        n = 0 if self.virtual_tokens is None else self.virtual_tokens.n_tokens
        if T + start_pos + n > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T + start_pos + n} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}"
                             + (f" ({n} of them virtual)" if n else ""))
        if positions is None:
            positions = torch.arange(start_pos, start_pos + T, device=input_ids.device)
        x = self.embed(input_ids)
        prefix: list | None = None
        n_prompt = 0
        if n:
            x, positions, attn_mask, prefix, n_prompt = self._add_virtual(x, positions, attn_mask, start_pos == 0)
            start_pos += n - n_prompt  # prepended prompt rows are part of this chunk; prefix rows are not
        if self.cfg.position == "learned":
            x = x + self.pos_embed(positions)
        elif self.cfg.position == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        x = self.embed_dropout(x)
        rope = self.rope(positions) if self.rope is not None else None
        attn_mask = self_attention_mask(self.cfg, x.shape[1], start_pos, x.dtype, x.device, base=attn_mask,
                                        prefix_len=prefix_len, alibi=getattr(self, "alibi", None),
                                        rel_bias=getattr(self, "rel_bias", None))
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, start_pos, attn_mask, None if prefix is None else prefix[i])
        return self.norm(x[:, n_prompt:] if n_prompt else x)

    def _add_virtual(self, x: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor | None,
                     first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list | None, int]:
        """Shift positions past the n virtual tokens; on the first chunk, prepend soft-prompt rows and fetch
        the per-layer prefix K/V (later chunks find them in the cache). Masks gain n always-visible keys."""
        vt, B = self.virtual_tokens, x.shape[0]
        n = vt.n_tokens
        positions = positions + n
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (n, 0), value=True)
        if not first:
            return x, positions, attn_mask, None, 0
        prompt, prefix = vt.embeddings(B), vt.layer_kv(B)
        if prompt is None:
            return x, positions, attn_mask, prefix, 0
        T = x.shape[1]
        x = torch.cat([prompt.to(x.dtype), x], dim=1)
        own = torch.arange(n, device=x.device)
        positions = torch.cat([own.expand(*positions.shape[:-1], n), positions], dim=-1)
        if attn_mask is not None:  # virtual rows see the virtual tokens before them only
            lead, S = attn_mask.shape[:-2], attn_mask.shape[-1]
            rows = own[:, None] >= torch.arange(S, device=x.device)[None, :]
            attn_mask = torch.cat([rows.expand(*lead, n, S), attn_mask.expand(*lead, T, S)], dim=-2)
        return x, positions, attn_mask, prefix, n

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
                positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                return_hidden: bool = False, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab], or the final hidden states [B, T, d] with `return_hidden` (for losses
        that apply the head themselves, chunk by chunk; torch.compile compiles only `forward`)."""
        h = self.hidden_states(input_ids, cache, start_pos, positions, attn_mask, prefix_len)
        if self.cfg.output_scale != 1.0:  # T5 with tied embeddings scales by d_model^-0.5 before the head
            h = h * self.cfg.output_scale
        return h if return_hidden else self.lm_head(h)

    @property
    def context_length(self) -> int:
        """Positions left for the caller's tokens: max_seq_len minus prompt/prefix-tuning virtual tokens."""
        return self.cfg.max_seq_len - (0 if self.virtual_tokens is None else self.virtual_tokens.n_tokens)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache | LatentCache:
        """A cache for `max_len` caller tokens (plus the virtual tokens' slots, if any): keys and values,
        or MLA's compressed latent + shared RoPE key (`LatentCache`, same `update` contract)."""
        p = self.embed.weight
        n = 0 if self.virtual_tokens is None else self.virtual_tokens.n_tokens
        size = self.cfg.max_seq_len if max_len is None else max_len + n
        cls = LatentCache if self.cfg.attention == "mla" else KVCache
        return cls(self.cfg, batch_size, size, dtype=p.dtype, device=p.device)

    def aux_losses(self, hidden: torch.Tensor | None = None, targets: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
        """Weighted auxiliary losses of the last training forward ({} for a plain model): MoE balance/z
        losses and, given final hidden states and targets, the MTP loss. Add their sum to the LM loss."""
        return aux_losses(self, hidden, targets)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
