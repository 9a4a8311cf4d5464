"""Encoder-decoder Transformer (T5, Raffel et al. 2020; BART, Lewis et al. 2020) from the decoder's own parts.

`EncoderDecoder` is a `Transformer` (embedding, positions, decoder blocks, final norm, LM head, KV cache) whose
decoder blocks also cross-attend, plus an encoder stack of the same `Block`s run bidirectionally. T5 relative
position bias is one table per stack: bidirectional buckets in the encoder, causal ones in the decoder.
Decoding caches the decoder's self-attention K/V (`KVCache`) and the cross-attention K/V of the encoder
output, computed once per source (`memory_kv`); `EncoderDecoder.bind` wraps both as a decoder-only module, so
`lmforge.generate.engine.generate` runs every decode strategy on it.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.attention import KVCache, self_attention_mask
from lmforge.model.config import ModelConfig
from lmforge.model.layers import deepnorm_constants, make_norm
from lmforge.model.positions import RelativePositionBias
from lmforge.model.transformer import Block, Transformer

MemoryKV = list[tuple[torch.Tensor, torch.Tensor]]


class EncoderDecoder(Transformer):
    """`forward(src_ids, tgt_ids)` -> logits [B, T_tgt, vocab]; `tgt_ids` are the decoder inputs (targets
    shifted right behind `cfg.decoder_start_id`). The embedding is shared by encoder, decoder and (tied) head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i, cross=True, role="decoder") for i in range(cfg.n_layers))
        self.encoder = nn.ModuleList(Block(cfg, i, role="encoder") for i in range(cfg.n_encoder_layers))
        self.enc_norm = make_norm(cfg) if cfg.norm_placement in ("pre", "sandwich") else nn.Identity()
        if cfg.position == "t5":
            self.enc_rel_bias = RelativePositionBias(cfg, bidirectional=True)
        if cfg.position == "learned":  # BART: separate learned positions per stack
            self.enc_pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.cfg.norm_placement == "deepnorm" and hasattr(self, "encoder"):
            for stack, role in ((self.encoder, "encoder"), (self.blocks, "decoder")):
                for block in stack:
                    block.deepnorm_init(deepnorm_constants(self.cfg, role)[1])

    def _embed(self, ids: torch.Tensor, start_pos: int, encoder: bool, positions: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, tuple | None]:
        T = ids.shape[1]
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(start_pos, start_pos + T, device=ids.device)
        x = self.embed(ids)
        if self.cfg.position == "learned":
            x = x + (self.enc_pos_embed if encoder else self.pos_embed)(positions)
        elif self.cfg.position == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        rope = self.rope(positions) if self.rope is not None else None
        return self.embed_dropout(x), rope

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output [B, S, d]; `src_mask` ([B, S], 1 = token, 0 = padding) hides padded keys."""
        x, rope = self._embed(src_ids, 0, encoder=True)
        base = None if src_mask is None else src_mask.bool()[:, None, None, :]
        mask = self_attention_mask(self.cfg, x.shape[1], 0, x.dtype, x.device, causal=False, base=base,
                                   alibi=getattr(self, "alibi", None), rel_bias=getattr(self, "enc_rel_bias", None))
        for block in self.encoder:
            x = block(x, rope, None, 0, mask)
        return self.enc_norm(x)

    def memory_kv(self, memory: torch.Tensor) -> MemoryKV:
        """Every decoder layer's cross-attention keys and values of `memory` (the cross K/V cache)."""
        return [block.cross_attn.memory_kv(memory) for block in self.blocks]

    def decode(self, tgt_ids: torch.Tensor, memory: MemoryKV, cache: KVCache | None = None, start_pos: int = 0,
               src_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder hidden states [B, T, d] (scaled by cfg.output_scale, ready for the LM head). `positions` and
        `attn_mask` (a caller's self-attention mask) are as in `Transformer.forward`."""
        x, rope = self._embed(tgt_ids, start_pos, encoder=False, positions=positions)
        mask = self_attention_mask(self.cfg, x.shape[1], start_pos, x.dtype, x.device, base=attn_mask,
                                   alibi=getattr(self, "alibi", None), rel_bias=getattr(self, "rel_bias", None))
        memory_mask = None if src_mask is None else src_mask.bool()[:, None, None, :]
        for block, kv in zip(self.blocks, memory):
            x = block(x, rope, cache, start_pos, mask, None, kv, memory_mask)
        return self.norm(x) * self.cfg.output_scale

    def bind(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None) -> SourceBound:
        """This model's decoder with `src_ids` encoded once: a module every decoder-only decode loop can run."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return SourceBound(self, self.memory_kv(self.encode(src_ids, src_mask)), src_mask)
        finally:
            self.train(was_training)

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor, src_mask: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        h = self.decode(tgt_ids, self.memory_kv(self.encode(src_ids, src_mask)), src_mask=src_mask)
        return h if return_hidden else self.lm_head(h)


def shift_right(targets: torch.Tensor, start_id: int, ignore_index: int = -100) -> torch.Tensor:
    """Decoder inputs for teacher forcing: [start, y_0, ..., y_{T-2}], ignored targets read as `start_id`."""
    inputs = torch.full_like(targets, start_id)
    inputs[:, 1:] = targets[:, :-1]
    return inputs.masked_fill(inputs == ignore_index, start_id)


class SourceBound(nn.Module):
    """An `EncoderDecoder`'s decoder over one encoded batch of sources, with the decoder-only interface the
    decode loops of `lmforge.generate` use: `forward(ids, cache, start_pos, positions, attn_mask,
    return_hidden)`, `new_cache`, `lm_head`, `context_length`. Memory of one source serves any number of rows
    (beams, contrastive candidates); otherwise row i reads source i."""

    virtual_tokens = None  # prompt/prefix tuning does not apply to the decoder of a seq2seq model

    def __init__(self, model: EncoderDecoder, memory: MemoryKV, src_mask: torch.Tensor | None) -> None:
        super().__init__()
        self.model, self.memory, self.src_mask = model, memory, src_mask
        self.cfg, self.lm_head = model.cfg, model.lm_head

    @property
    def context_length(self) -> int:
        return self.cfg.max_seq_len

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.model.new_cache(batch_size, max_len)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
                positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        B = input_ids.shape[0]
        memory, src_mask = self.memory, self.src_mask
        if memory[0][0].shape[0] != B:  # one source for every row
            memory = [(k.expand(B, *k.shape[1:]), v.expand(B, *v.shape[1:])) for k, v in memory]
            src_mask = None if src_mask is None else src_mask.expand(B, -1)
        h = self.model.decode(input_ids, memory, cache, start_pos, src_mask, positions, attn_mask)
        return h if return_hidden else self.lm_head(h)


def build_model(cfg: ModelConfig) -> Transformer:
    """The model `cfg.arch` names: a decoder-only `Transformer` or an `EncoderDecoder`."""
    return EncoderDecoder(cfg) if cfg.arch == "encdec" else Transformer(cfg)
