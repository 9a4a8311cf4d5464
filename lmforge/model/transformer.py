"""The causal decoder every stage shares. Pure modules: no losses, optimizers or parallelism here."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.attention import KVCache, self_attention_mask
from lmforge.model.block import Block
from lmforge.model.config import ModelConfig
from lmforge.model.layers import deepnorm_constants, make_norm
from lmforge.model.mla import LatentCache
from lmforge.model.mtp import MultiTokenPrediction, aux_losses
from lmforge.model.positions import RelativePositionBias, RotaryEmbedding, alibi_slopes, sinusoidal_table


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
            if prefix_len is not None:  # the caller counts its own tokens; they sit after the n virtual slots
                prefix_len = prefix_len + n
        x = self.add_positions(x, positions)
        rope = self.rope(positions) if self.rope is not None else None
        attn_mask = self_attention_mask(self.cfg, x.shape[1], start_pos, x.dtype, x.device, base=attn_mask,
                                        prefix_len=prefix_len, alibi=getattr(self, "alibi", None),
                                        rel_bias=getattr(self, "rel_bias", None))
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, start_pos, attn_mask, None if prefix is None else prefix[i])
        return self.norm(x[:, n_prompt:] if n_prompt else x)

    def add_positions(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings plus absolute position embeddings (learned or sinusoidal, else none), then embedding
        dropout. Reads only cfg, pos_embed, pos_table and embed_dropout (a pipeline's first stage reuses it)."""
        if self.cfg.position == "learned":
            x = x + self.pos_embed(positions)
        elif self.cfg.position == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        return self.embed_dropout(x)

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
