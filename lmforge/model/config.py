"""The model's one config: families (LLaMA, GPT-2-like, ...) differ by values here, not by classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lmforge.config import option
from lmforge.errors import ConfigError


@dataclass
class ModelConfig:
    preset: str = option("", "named preset to start from (see `lmforge.model.presets`); other keys override it")
    vocab_size: int = option(0, "vocabulary size; 0 takes it from the tokenizer")
    d_model: int = option(256, "hidden size")
    n_layers: int = option(4, "number of Transformer blocks")
    n_heads: int = option(4, "query heads")
    n_kv_heads: int = option(0, "key/value heads: = n_heads is MHA, 1 is MQA, in between is GQA; 0 means n_heads")
    head_dim: int = option(0, "per-head size; 0 means d_model // n_heads")
    d_ff: int = option(0, "MLP hidden size; 0 means 4*d_model (8/3*d_model for gated MLPs, rounded up)")
    ffn_multiple_of: int = option(64, "round the default gated-MLP hidden size up to a multiple of this")
    max_seq_len: int = option(256, "longest sequence (sizes learned positions and the KV cache)")
    norm: Literal["rmsnorm", "layernorm"] = option("rmsnorm", "normalization layer")
    norm_eps: float = option(1e-5, "epsilon of the norm layers")
    norm_placement: Literal["pre", "post"] = option(
        "pre", "norm before each sublayer (pre) or after the residual add (post)")
    mlp: Literal["swiglu", "gelu", "relu"] = option("swiglu", "MLP type: gated SwiGLU or plain GeLU/ReLU")
    position: Literal["rope", "learned", "sinusoidal", "none"] = option("rope", "position encoding")
    rope_theta: float = option(10000.0, "RoPE base frequency")
    rope_scaling: Literal["none", "linear", "dynamic", "yarn", "llama3"] = option(
        "none", "RoPE context extension: position interpolation, dynamic NTK, YaRN or LLaMA 3.1 style")
    rope_factor: float = option(1.0, "RoPE scaling factor s (new context / original context)")
    rope_original_max_seq_len: int = option(0, "context the model was pretrained with; 0 means max_seq_len")
    rope_low_freq_factor: float = option(1.0, "llama3: wavelengths over original/low_freq_factor are divided by s")
    rope_high_freq_factor: float = option(4.0, "llama3: wavelengths under original/high_freq_factor are kept")
    rope_beta_fast: float = option(32.0, "yarn: dims rotating more than this over the original context are kept")
    rope_beta_slow: float = option(1.0, "yarn: dims rotating less than this over the original context are scaled")
    tie_embeddings: bool = option(False, "share the input embedding with the output projection")
    bias: bool = option(False, "bias in every linear layer (GPT-2 style)")
    qkv_bias: bool = option(False, "bias on the q/k/v projections only (Qwen2 style)")
    dropout: float = option(0.0, "dropout on attention probabilities and residual branches")
    init_std: float = option(0.02, "std of the normal init; residual output projections get std/sqrt(2*n_layers)")

    def __post_init__(self) -> None:
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.head_dim == 0 and self.n_heads > 0:
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff == 0:
            if self.gated_mlp:
                hidden = int(8 * self.d_model / 3)
                m = self.ffn_multiple_of
                self.d_ff = m * ((hidden + m - 1) // m)
            else:
                self.d_ff = 4 * self.d_model
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                              f"({self.n_kv_heads})")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling == "none":
            return
        if self.position != "rope":
            raise ConfigError(f"model.rope_scaling={self.rope_scaling!r} needs model.position='rope', "
                              f"got {self.position!r}")
        if self.rope_factor < 1:
            raise ConfigError(f"model.rope_factor must be >= 1, got {self.rope_factor}")
        if self.rope_original_max_seq_len < 0:
            raise ConfigError(f"model.rope_original_max_seq_len must be >= 0, got {self.rope_original_max_seq_len}")
        if self.rope_scaling == "dynamic" and self.head_dim <= 2:
            raise ConfigError(f"model.head_dim must be > 2 for dynamic RoPE, got {self.head_dim}")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ConfigError(f"model.rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed "
                              f"model.rope_low_freq_factor ({self.rope_low_freq_factor}) > 0")
        if self.rope_scaling == "yarn" and not 0 < self.rope_beta_slow < self.rope_beta_fast:
            raise ConfigError(f"model.rope_beta_fast ({self.rope_beta_fast}) must exceed "
                              f"model.rope_beta_slow ({self.rope_beta_slow}) > 0")

    @property
    def gated_mlp(self) -> bool:
        return self.mlp == "swiglu"

    @classmethod
    def __config_expand__(cls, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        """Start from the named preset; keys given next to it override its values."""
        name = data.get("preset")
        if not name:
            return data
        from lmforge.model.presets import preset_dict

        return {**preset_dict(name), **data}

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count, from a model built on the meta device (no memory used)."""
        import torch

        from lmforge.model.transformer import Transformer

        with torch.device("meta"):
            model = Transformer(self)
        total = sum(p.numel() for p in model.parameters())
        if not include_embeddings:
            total -= sum(p.numel() for n, p in model.named_parameters() if n in ("embed.weight", "lm_head.weight",
                                                                                "pos_embed.weight"))
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * (non-embedding params + lm head) plus attention scores."""
        dense = self.num_params(include_embeddings=False) + self.vocab_size * self.d_model
        attn = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len / 2  # causal: half the matrix
        return 6 * dense + attn
