"""GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm with bias, tanh-GeLU MLP, tied head.

GPT-2 keeps its projections in `Conv1D` modules whose weight is [in, out], the transpose of `nn.Linear`'s, so
every `c_*` weight is transposed on the way in and out; `c_attn` is already the fused [q; k; v].
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.hf.base import ModuleMap, StackedAdapter, config_from_values, require

DEFAULTS: dict[str, Any] = dict(n_positions=1024, n_inner=None, layer_norm_epsilon=1e-5,
                                activation_function="gelu_new", tie_word_embeddings=True,
                                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# GPT-2's exact shape: what `hf_config_from_model` requires of a ModelConfig.
WANTED = dict(norm="layernorm", norm_placement="pre", mlp="gelu", position="learned", bias=True, qkv_bias=False,
              sliding_window=0, attn_scale=0.0, output_scale=1.0, arch="decoder")


class GPT2Adapter(StackedAdapter):
    model_type, architecture = "gpt2", "GPT2LMHeadModel"
    null_token_ids = False

    def claims(self, cfg: ModelConfig, recorded: str | None) -> bool:
        return cfg.position == "learned" and cfg.norm == "layernorm"

    def transposed(self, hf_name: str) -> bool:
        return hf_name.rsplit(".", 1)[-1].startswith("c_")

    def normalize_state(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoints saved from the bare `GPT2Model` (the original `gpt2` ones) lack the `transformer.` prefix;
        the causal-mask buffers old versions stored (`attn.bias`, `attn.masked_bias`) are no weights."""
        out = {}
        for key, value in hf_state.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            out[key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"] = value
        return out

    def config_from_hf(self, hf: dict[str, Any], source: str) -> ModelConfig:
        get = {**DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}.get
        for key in ("vocab_size", "n_embd", "n_layer", "n_head"):
            if get(key) is None:
                raise LmforgeError(f"{source}: model_type 'gpt2' config has no '{key}'")
        if get("activation_function") not in TANH_GELUS:
            raise LmforgeError(f"{source}: activation_function '{get('activation_function')}' is not supported "
                               f"(GPT-2 uses {TANH_GELUS[0]})")
        if get("scale_attn_by_inverse_layer_idx") or not get("scale_attn_weights"):
            raise LmforgeError(f"{source}: only 1/sqrt(head_dim) attention scaling is supported "
                               "(scale_attn_weights=true, scale_attn_by_inverse_layer_idx=false)")
        d = int(get("n_embd"))
        values = dict(vocab_size=get("vocab_size"), d_model=d, n_layers=get("n_layer"), n_heads=get("n_head"),
                      d_ff=get("n_inner") or 4 * d, max_seq_len=get("n_positions"),
                      norm_eps=get("layer_norm_epsilon"), tie_embeddings=bool(get("tie_word_embeddings")),
                      init_std=get("initializer_range", 0.02), **WANTED)
        return config_from_values(values, source)

    def config_to_hf(self, cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
        return {"architectures": [self.architecture], "model_type": self.model_type, "vocab_size": cfg.vocab_size,
                "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
                "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new",
                "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "use_cache": True}

    def check(self, cfg: ModelConfig) -> None:
        require(cfg, WANTED, self.architecture)
        if cfg.n_kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.d_model:
            raise LmforgeError(f"model.n_kv_heads/head_dim cannot be exported as {self.architecture} (it needs "
                               "MHA with head_dim = d_model / n_heads)")

    def module_map(self, cfg: ModelConfig) -> ModuleMap:
        d, ff = cfg.d_model, cfg.d_ff
        out = [("embed", [("transformer.wte", cfg.vocab_size)]),
               ("pos_embed", [("transformer.wpe", cfg.max_seq_len)])]
        for i in range(cfg.n_layers):
            h = f"transformer.h.{i}."
            out += [
                (f"blocks.{i}.attn_norm", [(h + "ln_1", d)]),
                (f"blocks.{i}.attn.qkv", [(h + "attn.c_attn", 3 * d)]),
                (f"blocks.{i}.attn.out", [(h + "attn.c_proj", d)]),
                (f"blocks.{i}.mlp_norm", [(h + "ln_2", d)]),
                (f"blocks.{i}.mlp.up", [(h + "mlp.c_fc", ff)]),
                (f"blocks.{i}.mlp.down", [(h + "mlp.c_proj", d)]),
            ]
        out.append(("norm", [("transformer.ln_f", d)]))
        if not cfg.tie_embeddings:
            out.append(("lm_head", [("lm_head", cfg.vocab_size)]))
        return out
