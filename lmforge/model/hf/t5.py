"""T5 (`T5ForConditionalGeneration`): original T5 (ReLU MLP, tied head with d^-0.5 output
scaling) and T5 v1.1 (gated-GeLU MLP, untied head). Both are pre-RMSNorm encoder-decoders without biases,
with unscaled q.k (T5 folds the 1/sqrt(d) into its init) and one relative-bias table per stack, owned by
block 0 in HF and by `enc_rel_bias` / `rel_bias` here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.hf.base import ModuleMap, StackedAdapter, config_from_values, require

DEFAULTS: dict[str, Any] = dict(d_kv=64, d_ff=2048, num_heads=8, relative_attention_num_buckets=32,
                                relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                                feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0)
MLPS = {"relu": "relu", "gated-gelu": "geglu"}
WANTED = dict(arch="encdec", norm="rmsnorm", norm_placement="pre", position="t5", attn_scale=1.0, bias=False,
              qkv_bias=False, sliding_window=0)


class T5Adapter(StackedAdapter):
    model_type, architecture = "t5", "T5ForConditionalGeneration"
    null_token_ids = False  # keep T5's own pad 0

    def claims(self, cfg: ModelConfig, recorded: str | None) -> bool:
        return cfg.arch == "encdec"

    def normalize_state(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The per-stack embedding copies are the shared table; drop them."""
        return {k: v for k, v in hf_state.items()
                if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}

    def config_from_hf(self, hf: dict[str, Any], source: str) -> ModelConfig:
        get = {**DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}.get
        for key in ("vocab_size", "d_model", "num_layers"):
            if get(key) is None:
                raise LmforgeError(f"{source}: model_type 't5' config has no '{key}'")
        proj = get("feed_forward_proj")
        if proj not in MLPS:
            raise LmforgeError(f"{source}: feed_forward_proj '{proj}' is not supported; supported: {', '.join(MLPS)}")
        # transformers 5 writes scale_decoder_outputs; 4.x scaled exactly when the head was tied.
        scale = get("scale_decoder_outputs", get("tie_word_embeddings", True) is not False)
        d = int(get("d_model"))
        values = dict(vocab_size=get("vocab_size"), d_model=d, n_layers=get("num_decoder_layers") or get("num_layers"),
                      n_encoder_layers=get("num_layers"), n_heads=get("num_heads"), head_dim=get("d_kv"),
                      d_ff=get("d_ff"), mlp=MLPS[proj], norm_eps=get("layer_norm_epsilon"),
                      rel_buckets=get("relative_attention_num_buckets"),
                      rel_max_distance=get("relative_attention_max_distance"),
                      max_seq_len=int(hf.get("n_positions") or 512), output_scale=d ** -0.5 if scale else 1.0,
                      tie_embeddings=get("tie_word_embeddings", True) is not False,
                      decoder_start_id=get("decoder_start_token_id"), **WANTED)
        return config_from_values(values, source)

    def config_to_hf(self, cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
        return {"architectures": [self.architecture], "model_type": self.model_type, "is_encoder_decoder": True,
                "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.d_ff,
                "num_layers": cfg.n_encoder_layers, "num_decoder_layers": cfg.n_layers, "num_heads": cfg.n_heads,
                "relative_attention_num_buckets": cfg.rel_buckets,
                "relative_attention_max_distance": cfg.rel_max_distance, "layer_norm_epsilon": cfg.norm_eps,
                "feed_forward_proj": {v: k for k, v in MLPS.items()}[cfg.mlp], "dropout_rate": 0.0,
                "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": cfg.output_scale != 1.0,
                "decoder_start_token_id": cfg.decoder_start_id, "n_positions": cfg.max_seq_len, "use_cache": True}

    def check(self, cfg: ModelConfig) -> None:
        require(cfg, WANTED, self.architecture)
        if cfg.mlp not in MLPS.values():
            raise LmforgeError(f"model.mlp={cfg.mlp!r} cannot be exported as {self.architecture} (relu or geglu)")
        if cfg.n_kv_heads != cfg.n_heads:
            raise LmforgeError(f"model.n_kv_heads={cfg.n_kv_heads} cannot be exported as {self.architecture} "
                               "(MHA only)")
        if cfg.output_scale not in (1.0, cfg.d_model ** -0.5):
            raise LmforgeError(f"model.output_scale={cfg.output_scale} cannot be exported as {self.architecture} "
                               "(1 or d_model^-0.5)")

    def fit_weights(self, cfg: ModelConfig, hf_state: dict[str, torch.Tensor]) -> ModelConfig:
        """transformers 5 calls every T5 tied; v1.1 is not, as its differing `lm_head` shows."""
        if "lm_head.weight" in hf_state and "shared.weight" in hf_state \
                and not torch.equal(hf_state["lm_head.weight"], hf_state["shared.weight"]):
            return dataclasses.replace(cfg, tie_embeddings=False)
        return cfg

    def module_map(self, cfg: ModelConfig) -> ModuleMap:
        return t5_module_map(cfg)


def _mlp(ours: str, hf: str, cfg: ModelConfig) -> ModuleMap:
    ff, d = cfg.d_ff, cfg.d_model
    up = [(hf + "wi_0", ff), (hf + "wi_1", ff)] if cfg.gated_mlp else [(hf + "wi", ff)]
    return [(ours + "up", up), (ours + "down", [(hf + "wo", d)])]


def t5_module_map(cfg: ModelConfig) -> ModuleMap:
    d, inner = cfg.d_model, cfg.n_heads * cfg.head_dim
    out = [("embed", [("shared", cfg.vocab_size)])]
    for ours, hf, n, cross in (("encoder", "encoder", cfg.n_encoder_layers, False),
                               ("blocks", "decoder", cfg.n_layers, True)):
        for i in range(n):
            o, h = f"{ours}.{i}.", f"{hf}.block.{i}.layer."
            sa = h + "0.SelfAttention."
            out += [(o + "attn_norm", [(h + "0.layer_norm", d)]),
                    (o + "attn.qkv", [(sa + "q", inner), (sa + "k", inner), (sa + "v", inner)]),
                    (o + "attn.out", [(sa + "o", d)])]
            ff = 2 if cross else 1
            if cross:
                ca = h + "1.EncDecAttention."
                out += [(o + "cross_norm", [(h + "1.layer_norm", d)]),
                        (o + "cross_attn.q", [(ca + "q", inner)]),
                        (o + "cross_attn.kv", [(ca + "k", inner), (ca + "v", inner)]),
                        (o + "cross_attn.out", [(ca + "o", d)])]
            out += [(o + "mlp_norm", [(h + f"{ff}.layer_norm", d)])]
            out += _mlp(o + "mlp.", h + f"{ff}.DenseReluDense.", cfg)
    buckets = cfg.rel_buckets
    out += [("enc_rel_bias.embed", [("encoder.block.0.layer.0.SelfAttention.relative_attention_bias", buckets)]),
            ("rel_bias.embed", [("decoder.block.0.layer.0.SelfAttention.relative_attention_bias", buckets)]),
            ("enc_norm", [("encoder.final_layer_norm", d)]), ("norm", [("decoder.final_layer_norm", d)])]
    if not cfg.tie_embeddings:
        out.append(("lm_head", [("lm_head", cfg.vocab_size)]))
    return out
