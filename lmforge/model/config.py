"""The model's one config: families (LLaMA, GPT-2-like, ...) differ by values here, not by classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lmforge.core.config import option, require
from lmforge.model.presets import preset_dict


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
    norm_placement: Literal["pre", "post", "sandwich", "deepnorm"] = option(
        "pre", "norm before each sublayer (pre), after the residual add (post), both around the sublayer "
               "(sandwich, CogView) or post-norm with the residual scaled by alpha (deepnorm, Wang et al. 2022)")
    mlp: Literal["swiglu", "geglu", "gelu", "relu"] = option(
        "swiglu", "MLP type: gated SwiGLU/GeGLU (Shazeer 2020) or plain GeLU/ReLU")
    position: Literal["rope", "learned", "sinusoidal", "alibi", "t5", "none"] = option(
        "rope", "position encoding (alibi: Press et al. 2022 linear biases; t5: bucketed relative bias)")
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
    # Mixture-of-Experts FFN (lmforge.model.moe): Switch/GLaM softmax routing or DeepSeekMoE sigmoid routing.
    moe_experts: int = option(0, "routed experts per MoE layer; 0 keeps every FFN dense")
    moe_top_k: int = option(2, "experts each token is sent to (Switch: 1, GLaM: 2, DeepSeek-V3: 8)")
    moe_shared_experts: int = option(0, "always-active shared experts (DeepSeekMoE), each moe_d_ff wide")
    moe_d_ff: int = option(0, "hidden size of one expert; 0 means d_ff")
    moe_router: Literal["softmax", "sigmoid"] = option(
        "softmax", "gate affinity: softmax over experts (Switch/GLaM) or per-expert sigmoid (DeepSeek-V3)")
    moe_norm_top_k: bool = option(False, "renormalize the top-k gate values to sum to 1 (DeepSeek-V3: true)")
    moe_routed_scale: float = option(1.0, "multiplier on the routed experts' gate values (DeepSeek-V3: 2.5)")
    moe_groups: int = option(1, "expert groups for group-limited routing (DeepSeek-V3: 8); 1 disables it")
    moe_top_groups: int = option(1, "groups a token may route into (DeepSeek-V3: 4)")
    moe_capacity_factor: float = option(0.0, "expert capacity = factor * tokens * top_k / experts; tokens past "
                                             "it are dropped (Switch); 0 means no limit")
    moe_aux_loss_weight: float = option(0.0, "load-balancing loss weight alpha (Switch eq. 4; 0.01 there)")
    moe_z_loss_weight: float = option(0.0, "router z-loss weight (ST-MoE eq. 5; 0.001 there)")
    moe_seq_aux_weight: float = option(0.0, "complementary sequence-wise balance loss weight (DeepSeek-V3 eq. 17)")
    moe_bias_update_rate: float = option(0.0, "aux-loss-free balancing: per-expert bias step gamma after each "
                                              "optimizer step (DeepSeek-V3: 0.001); 0 disables it")
    moe_first_dense: int = option(0, "the first this many blocks keep a dense FFN (DeepSeek-V3: 3)")
    # Multi-head latent attention (lmforge.model.mla, DeepSeek-V2/V3).
    attention: Literal["mha", "mla"] = option("mha", "attention: mha (MHA/GQA/MQA by n_kv_heads) or mla (latent)")
    kv_lora_rank: int = option(0, "mla: rank of the compressed joint KV latent (the cached part)")
    q_lora_rank: int = option(0, "mla: rank of the query compression; 0 projects queries directly")
    qk_rope_head_dim: int = option(0, "mla: per-head size of the decoupled RoPE query/key (shared key)")
    qk_nope_head_dim: int = option(0, "mla: per-head size of the position-free query/key part")
    v_head_dim: int = option(0, "mla: per-head value size; 0 means qk_nope_head_dim")
    mla_mscale: float = option(0.0, "mla + yarn (DeepSeek's `mscale`): with mla_mscale_all_dim, RoPE's cos/sin get "
                                    "(0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1); 0: YaRN's default")
    mla_mscale_all_dim: float = option(0.0, "mla + yarn (DeepSeek's `mscale_all_dim`): the softmax scale is "
                                            "multiplied by (0.1 mscale_all_dim ln s + 1)^2; 0: unscaled")
    # Multi-token prediction (lmforge.model.mtp, DeepSeek-V3 section 2.2).
    mtp_depth: int = option(0, "MTP modules D: module k predicts the token k+1 ahead; 0 disables MTP")
    mtp_loss_weight: float = option(0.3, "MTP loss weight lambda (the mean over depths is scaled by it)")
    # Layer zoo, windows and encoder-decoder (lmforge.model.attention/positions/encdec).
    sliding_window: int = option(0, "each query sees the last this many keys, itself included (Mistral); 0: all")
    rel_buckets: int = option(32, "t5 positions: relative-distance buckets (half exact, half log-spaced)")
    rel_max_distance: int = option(128, "t5 positions: distances past this share the last bucket")
    attn_scale: float = option(0.0, "multiplier on q.k; 0 means 1/sqrt(head_dim) (T5 uses 1.0)")
    output_scale: float = option(1.0, "multiplier on the final hidden state before the LM head (T5 tied: d^-0.5)")
    deepnorm_alpha: float = option(0.0, "deepnorm residual scale; 0 means (2 * n_layers)^(1/4) (decoder-only)")
    deepnorm_beta: float = option(0.0, "deepnorm init gain of v/out/FFN weights; 0 means (8 * n_layers)^(-1/4)")
    arch: Literal["decoder", "encdec"] = option(
        "decoder", "decoder-only Transformer, or encoder-decoder (lmforge.model.encdec, T5/BART style)")
    n_encoder_layers: int = option(0, "encdec: encoder blocks; 0 means n_layers (decoder blocks)")
    decoder_start_id: int = option(0, "encdec: first decoder input token (T5: the pad id 0)")
    prefix_lm: bool = option(False, "decoder: a prefix LM (trained with a denoising objective): generation and "
                                    "eval read the prompt bidirectionally, the answer causally")

    def __post_init__(self) -> None:
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.attention == "mla":  # MLA rotates only the decoupled RoPE part; RoPE tables are sized by head_dim
            require(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim",
                    self.qk_rope_head_dim, "positive and even for attention='mla'")
            self.head_dim = self.qk_rope_head_dim
        if self.head_dim == 0 and self.n_heads > 0:
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff == 0:
            if self.gated_mlp:
                hidden = int(8 * self.d_model / 3)
                m = self.ffn_multiple_of
                self.d_ff = m * ((hidden + m - 1) // m)
            else:
                self.d_ff = 4 * self.d_model
        self._at_least(1, "d_model", "n_layers", "n_heads", "max_seq_len")
        require(self.n_heads % self.n_kv_heads == 0, "model.n_heads", self.n_heads,
                f"a multiple of model.n_kv_heads={self.n_kv_heads}")
        require(self.position != "rope" or self.head_dim % 2 == 0, "model.head_dim", self.head_dim, "even for RoPE")
        self._check_rope_scaling()
        self._check_zoo()
        self._check_moe()
        self._check_mla()
        require(not (self.prefix_lm and self.arch == "encdec"), "model.prefix_lm", self.prefix_lm,
                "false for model.arch='encdec' (its encoder already reads the prompt both ways)")
        self._at_least(0, "mtp_depth")

    def _at_least(self, minimum: int, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            require(value >= minimum, f"model.{name}", value, "positive" if minimum == 1 else f">= {minimum}")

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling == "none":
            return
        require(self.position == "rope", "model.position", self.position,
                f"'rope' for model.rope_scaling={self.rope_scaling!r}")
        require(self.rope_factor >= 1, "model.rope_factor", self.rope_factor, ">= 1")
        self._at_least(0, "rope_original_max_seq_len")
        require(self.rope_scaling != "dynamic" or self.head_dim > 2, "model.head_dim", self.head_dim,
                "> 2 for dynamic RoPE")
        low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
        require(self.rope_scaling != "llama3" or 0 < low < high, "model.rope_high_freq_factor", high,
                f"above model.rope_low_freq_factor={low}, itself > 0")
        slow, fast = self.rope_beta_slow, self.rope_beta_fast
        require(self.rope_scaling != "yarn" or 0 < slow < fast, "model.rope_beta_fast", fast,
                f"above model.rope_beta_slow={slow}, itself > 0")

    def _check_moe(self) -> None:
        if self.moe_experts == 0:
            return
        if self.moe_d_ff == 0:
            self.moe_d_ff = self.d_ff
        self._at_least(1, "moe_experts")
        require(1 <= self.moe_top_k <= self.moe_experts, "model.moe_top_k", self.moe_top_k,
                f"in [1, moe_experts={self.moe_experts}]")
        self._at_least(0, "moe_shared_experts", "moe_first_dense", "moe_capacity_factor", "moe_aux_loss_weight",
                       "moe_z_loss_weight", "moe_seq_aux_weight", "moe_bias_update_rate")
        require(self.moe_experts % self.moe_groups == 0, "model.moe_experts", self.moe_experts,
                f"a multiple of model.moe_groups={self.moe_groups}")
        require(1 <= self.moe_top_groups <= self.moe_groups, "model.moe_top_groups", self.moe_top_groups,
                f"in [1, moe_groups={self.moe_groups}]")
        reachable = self.moe_top_groups * (self.moe_experts // self.moe_groups)
        require(self.moe_top_k <= reachable, "model.moe_top_k", self.moe_top_k,
                f"at most the {reachable} experts in moe_top_groups={self.moe_top_groups} groups")
        require(not self.moe_bias_update_rate or self.moe_router == "sigmoid", "model.moe_router", self.moe_router,
                "'sigmoid' when model.moe_bias_update_rate is set (DeepSeek-V3 balancing)")

    def _check_mla(self) -> None:
        if self.attention != "mla":
            return
        if self.v_head_dim == 0:
            self.v_head_dim = self.qk_nope_head_dim
        self._at_least(1, "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim")
        self._at_least(0, "q_lora_rank")
        require(not (self.mla_mscale or self.mla_mscale_all_dim) or self.rope_scaling == "yarn",
                "model.rope_scaling", self.rope_scaling, "'yarn' for model.mla_mscale/mla_mscale_all_dim")
        # an even qk_rope_head_dim was checked in __post_init__, before head_dim was derived from it
        require(self.position == "rope", "model.position", self.position, "'rope' for model.attention='mla'")

    def _check_zoo(self) -> None:
        self._at_least(0, "sliding_window", "n_encoder_layers", "decoder_start_id", "deepnorm_alpha",
                       "deepnorm_beta", "attn_scale")
        require(self.position != "t5" or 4 <= self.rel_buckets <= self.rel_max_distance, "model.rel_buckets",
                self.rel_buckets, f"in [4, model.rel_max_distance={self.rel_max_distance}]")
        require(self.output_scale > 0, "model.output_scale", self.output_scale, "positive")
        if self.n_encoder_layers == 0:
            self.n_encoder_layers = self.n_layers

    @property
    def gated_mlp(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    @classmethod
    def __config_expand__(cls, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        """Start from the named preset; keys given next to it override its values."""
        name = data.get("preset")
        if not name:
            return data

        return {**preset_dict(name), **data}

