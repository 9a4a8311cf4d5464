"""Named model presets. Public families use their published shapes; `debug`/`tiny`/`small` are for tests,
quickstart and benchmarks on a CPU."""

from __future__ import annotations

from typing import Any

from lmforge.core.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA 2 (Touvron et al., 2023): MHA, SwiGLU 11008, RMSNorm 1e-5, RoPE 10k, 4k context.
    "llama2-7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
                      max_seq_len=4096, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", position="rope",
                      rope_theta=10000.0, tie_embeddings=False),
    # LLaMA 3 (Dubey et al., 2024): GQA with 8 KV heads, 128K vocab, RoPE base 500k, 8k context.
    "llama3-8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                      max_seq_len=8192, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", position="rope",
                      rope_theta=500000.0, tie_embeddings=False),
    # LLaMA 3.1: the 3-8B shapes with 128K context through LLaMA-3 style RoPE scaling (factor 8 over 8K).
    "llama3.1-8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                        max_seq_len=131072, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", position="rope",
                        rope_theta=500000.0, tie_embeddings=False, rope_scaling="llama3", rope_factor=8.0,
                        rope_original_max_seq_len=8192, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0),
    # Tiny LLaMA-shaped models for tests and CPU runs.
    "debug": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128),
    "tiny": dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=256),
    "small": dict(d_model=768, n_layers=4, n_heads=12, n_kv_heads=12, d_ff=2048, max_seq_len=512),
    # GPT-2 small (Radford et al., 2019): learned positions, pre-LayerNorm with biases, tanh-GeLU, tied head.
    "gpt2": dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024,
                 norm="layernorm", norm_eps=1e-5, mlp="gelu", position="learned", bias=True, tie_embeddings=True),
    # Qwen2-0.5B (Qwen team, 2024): GQA 14/2, q/k/v biases, tied head, RoPE 1M.
    "qwen2-0.5b": dict(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, d_ff=4864,
                       max_seq_len=32768, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True),
    # Mistral 7B v0.1 (Jiang et al., 2023): GQA 32/8, 4096-token sliding window over an 8K/32K context.
    "mistral-7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                       max_seq_len=32768, norm_eps=1e-5, sliding_window=4096),
    # T5 (Raffel et al., 2020): pre-RMSNorm encoder-decoder, relative bias (32 buckets, 128), unscaled q.k.
    # Original T5-small: ReLU MLP, tied head with the d^-0.5 output scale; v1.1-base: gated-GeLU, untied.
    "t5-small": dict(arch="encdec", vocab_size=32128, d_model=512, n_layers=6, n_heads=8, head_dim=64, d_ff=2048,
                     max_seq_len=512, norm_eps=1e-6, mlp="relu", position="t5", attn_scale=1.0,
                     tie_embeddings=True, output_scale=512 ** -0.5),
    "t5-v1.1-base": dict(arch="encdec", vocab_size=32128, d_model=768, n_layers=12, n_heads=12, head_dim=64,
                         d_ff=2048, max_seq_len=512, norm_eps=1e-6, mlp="geglu", position="t5", attn_scale=1.0),
    # CPU-sized relatives of `tiny` for `quickstart --arch prefix|t5`: the prefix decoder is `tiny` itself
    # (the prefix LM objective makes it one); t5-tiny splits tiny's 6 blocks into 3 encoder + 3 decoder.
    "prefix-tiny": dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=256),
    "t5-tiny": dict(arch="encdec", d_model=256, n_layers=3, n_encoder_layers=3, n_heads=8, d_ff=704,
                    max_seq_len=512, norm_eps=1e-6, mlp="geglu", position="t5", attn_scale=1.0),
    # DeepSeek-V3 (DeepSeek-AI, 2024; deepseek-ai/DeepSeek-V3-Base, 14.8T tokens): 671B total / 37B active.
    # MLA (latent 512, q latent 1536, RoPE key 64), 3 dense blocks then DeepSeekMoE (1 shared + 256 routed
    # experts of 2048, top-8 in 4 of 8 groups, sigmoid, scale 2.5), 1 MTP module; 128K context by YaRN
    # (factor 40 over the 4K pretraining context, DeepSeek's mscale = mscale_all_dim = 1).
    "deepseek-v3": dict(vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, d_ff=18432, max_seq_len=163840,
                        rope_scaling="yarn", rope_factor=40.0, rope_original_max_seq_len=4096, rope_beta_fast=32.0,
                        rope_beta_slow=1.0, mla_mscale=1.0, mla_mscale_all_dim=1.0, norm_eps=1e-6, attention="mla",
                        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        qk_nope_head_dim=128, v_head_dim=128, moe_experts=256, moe_top_k=8, moe_shared_experts=1,
                        moe_d_ff=2048, moe_router="sigmoid", moe_norm_top_k=True, moe_routed_scale=2.5,
                        moe_groups=8, moe_top_groups=4, moe_first_dense=3, moe_bias_update_rate=0.001,
                        moe_seq_aux_weight=0.0001, mtp_depth=1, mtp_loss_weight=0.3),
    # CPU-sized relatives of `tiny` (same width/depth, ~same active FFN params) for `quickstart --arch moe|mla`.
    "moe-tiny": dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=256, moe_experts=8,
                     moe_top_k=2, moe_d_ff=352, moe_norm_top_k=True, moe_aux_loss_weight=0.01,
                     moe_z_loss_weight=0.001),  # GLaM-style top-2 of 8 (2 x 352 = tiny's 704 active)
    "mla-tiny": dict(d_model=256, n_layers=6, n_heads=8, d_ff=704, max_seq_len=256, attention="mla",
                     kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32),
    "deepseek-v3-tiny": dict(d_model=256, n_layers=6, n_heads=8, d_ff=704, max_seq_len=256, norm_eps=1e-6,
                             attention="mla", kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16,
                             qk_nope_head_dim=32, v_head_dim=32, moe_experts=16, moe_top_k=4,
                             moe_shared_experts=1, moe_d_ff=144, moe_router="sigmoid", moe_norm_top_k=True,
                             moe_routed_scale=2.5, moe_groups=4, moe_top_groups=2, moe_first_dense=1,
                             moe_bias_update_rate=0.001, moe_seq_aux_weight=0.0001, mtp_depth=1,
                             mtp_loss_weight=0.3),
}

# One model-card line per preset: the public checkpoint its shape corresponds to and the corpus it was trained on.
CARDS: dict[str, str] = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf; 2T tokens of public web data (Touvron et al., 2023)",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B; 15T tokens of public data (Dubey et al., 2024)",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B; 15T tokens + long-context training (Dubey et al., 2024)",
    "gpt2": "openai-community/gpt2 (124M); WebText, 40GB of Reddit-linked pages (Radford et al., 2019)",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B; 12T multilingual tokens (Qwen2 technical report, 2024)",
    "mistral-7b": "mistralai/Mistral-7B-v0.1; undisclosed web corpus (Jiang et al., 2023)",
    "t5-small": "google-t5/t5-small; C4 span corruption + supervised multi-task mixture (Raffel et al., 2020)",
    "t5-v1.1-base": "google/t5-v1_1-base; C4 span corruption only, no supervised mixing",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3-Base; 14.8T tokens (DeepSeek-AI, 2024)",
    "debug": "no public checkpoint; tests only", "tiny": "no public checkpoint; trained by `lmforge quickstart`",
    "small": "no public checkpoint; CPU/GPU benchmarks",
    "prefix-tiny": "no public checkpoint; `quickstart --arch prefix` (prefix LM on the quickstart corpus)",
    "t5-tiny": "no public checkpoint; `quickstart --arch t5` (span corruption on the quickstart corpus)",
    "moe-tiny": "no public checkpoint; `quickstart --arch moe`",
    "mla-tiny": "no public checkpoint; `quickstart --arch mla`",
    "deepseek-v3-tiny": "no public checkpoint; a CPU-sized DeepSeek-V3 for tests",
}


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown model preset '{name}'{hint}; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[name])
