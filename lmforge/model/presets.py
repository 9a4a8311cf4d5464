"""Named model presets. Public families use their published shapes; `debug`/`tiny`/`small` are for tests,
quickstart and benchmarks on a CPU."""

from __future__ import annotations

from typing import Any

from lmforge.errors import ConfigError

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
}


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown model preset '{name}'{hint}; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[name])
