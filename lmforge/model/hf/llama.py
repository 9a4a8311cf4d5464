"""The LLaMA family: LLaMA, Mistral (a sliding window) and Qwen2 (q/k/v biases), one adapter each on a
shared base, since the three HF classes differ only in biases and windows.

The mapping is exact, not approximate: lmforge's RoPE uses HF's half-split (rotate_half) layout, so q/k
rows need no permutation, and the fused tensors are plain row concatenations,
`attn.qkv = [q_proj; k_proj; v_proj]` and `mlp.up = [gate_proj; up_proj]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmforge.core.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.hf.base import ModuleMap, StackedAdapter, config_from_values, require
from lmforge.model.hf.rope import rope_from_hf, rope_to_hf

REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# What the LLaMA-family classes hard-wire, in the order `check` reports it.
WANTED = dict(norm="rmsnorm", norm_placement="pre", mlp="swiglu", position="rope", arch="decoder",
              attn_scale=0.0, output_scale=1.0)


def llama_module_map(cfg: ModelConfig) -> ModuleMap:
    """LLaMA's HF module names (`model.layers.{i}.self_attn.q_proj`, ...) for lmforge's modules."""
    q, kv, ff = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    d = cfg.d_model
    out = [("embed", [("model.embed_tokens", cfg.vocab_size)])]
    for i in range(cfg.n_layers):
        hf, at, mlp = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out += [
            (f"blocks.{i}.attn_norm", [(hf + "input_layernorm", d)]),
            (f"blocks.{i}.attn.qkv", [(at + "q_proj", q), (at + "k_proj", kv), (at + "v_proj", kv)]),
            (f"blocks.{i}.attn.out", [(at + "o_proj", d)]),
            (f"blocks.{i}.mlp_norm", [(hf + "post_attention_layernorm", d)]),
            (f"blocks.{i}.mlp.up", [(mlp + "gate_proj", ff), (mlp + "up_proj", ff)]),
            (f"blocks.{i}.mlp.down", [(mlp + "down_proj", d)]),
        ]
    out.append(("norm", [("model.norm", d)]))
    if not cfg.tie_embeddings:
        out.append(("lm_head", [("lm_head", cfg.vocab_size)]))
    return out


class LlamaFamily(StackedAdapter):
    """What LLaMA, Mistral and Qwen2 share; a subclass sets the class attributes and `claims`."""

    # Values HF's config classes assume when config.json leaves a key out (save_pretrained drops defaults).
    defaults: dict[str, Any] = {}
    fixed_biases: dict[str, bool] | None = None  # (bias, qkv_bias) the HF class hard-wires; None: LLaMA's flags
    window_key = False  # config.json carries `sliding_window`
    windowed = False  # the HF class applies that window on every layer, so lmforge's can be exported

    def sliding_window(self, get: Callable[..., Any], source: str) -> int | None:
        return get("sliding_window")

    def config_from_hf(self, hf: dict[str, Any], source: str) -> ModelConfig:
        # An explicit null means "default" for every key but sliding_window, where it means "no window".
        given = {k: v for k, v in hf.items() if v is not None or k == "sliding_window"}
        get = {**self.defaults, **given}.get
        for key in REQUIRED_KEYS:
            if get(key) is None:
                raise LmforgeError(f"{source}: missing required field '{key}'")
        if get("hidden_act", "silu") != "silu":
            raise LmforgeError(f"{source}: hidden_act '{get('hidden_act')}' is not supported (LLaMA uses silu)")
        max_len = int(get("max_position_embeddings"))
        window = self.sliding_window(get, source)
        if window is not None and window >= max_len:
            window = None  # a window as long as the context changes nothing
        heads = int(get("num_attention_heads"))
        # LLaMA's attention_bias puts a bias on q, k, v and o: lmforge spells an o bias as `bias` (which
        # also biases the MLP, loaded as zeros when HF has none). Qwen2 biases q/k/v only.
        qkv_only = bool(self.fixed_biases and self.fixed_biases["qkv_bias"])
        rope = rope_from_hf(hf, get("rope_theta"), max_len, source)
        values = dict(
            vocab_size=get("vocab_size"), d_model=get("hidden_size"), n_layers=get("num_hidden_layers"),
            n_heads=heads, n_kv_heads=get("num_key_value_heads", heads),
            head_dim=get("head_dim") or int(get("hidden_size")) // heads, d_ff=get("intermediate_size"),
            max_seq_len=rope.pop("max_seq_len", max_len), norm="rmsnorm", norm_eps=get("rms_norm_eps"),
            norm_placement="pre", mlp="swiglu", position="rope", **rope,
            tie_embeddings=bool(get("tie_word_embeddings")), qkv_bias=qkv_only,
            bias=bool(get("mlp_bias")) or (bool(get("attention_bias")) and not qkv_only),
            init_std=get("initializer_range", 0.02), sliding_window=window or 0,
        )
        return config_from_values(values, source)

    def check(self, cfg: ModelConfig) -> None:
        wanted = dict(WANTED)
        if not self.windowed:
            wanted["sliding_window"] = 0
        require(cfg, {**wanted, **(self.fixed_biases or {})}, self.architecture)
        if cfg.vocab_size <= 0:
            raise LmforgeError(f"model.vocab_size must be positive to export, got {cfg.vocab_size}")

    def config_to_hf(self, cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
        window = {"sliding_window": cfg.sliding_window or None} if self.window_key else {}
        return {
            "architectures": [self.architecture], "model_type": self.model_type, **window,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, **rope_to_hf(cfg),
            "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.bias or cfg.qkv_bias,
            "mlp_bias": cfg.bias, "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        }

    def module_map(self, cfg: ModelConfig) -> ModuleMap:
        return llama_module_map(cfg)

    def zero_biases(self, cfg: ModelConfig) -> dict[str, bool]:
        if self.fixed_biases is not None:
            return {}
        # LLaMA's attention_bias covers q, k, v and o: with lmforge's qkv_bias alone, o_proj gets a zero bias.
        return {"self_attn": cfg.bias or cfg.qkv_bias, "mlp": cfg.bias}


class LlamaAdapter(LlamaFamily):
    model_type, architecture = "llama", "LlamaForCausalLM"
    defaults = dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                    tie_word_embeddings=False, attention_bias=False, mlp_bias=False, sliding_window=None)

    def claims(self, cfg: ModelConfig, recorded: str | None) -> bool:
        return True  # the fallback of every decoder family before it


class MistralAdapter(LlamaFamily):
    model_type, architecture = "mistral", "MistralForCausalLM"
    defaults = dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096 * 32,
                    tie_word_embeddings=False, sliding_window=4096)
    fixed_biases = dict(bias=False, qkv_bias=False)
    window_key = windowed = True

    def claims(self, cfg: ModelConfig, recorded: str | None) -> bool:
        return bool(cfg.sliding_window) or recorded == self.model_type


class Qwen2Adapter(LlamaFamily):
    model_type, architecture = "qwen2", "Qwen2ForCausalLM"
    defaults = dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
                    tie_word_embeddings=False, sliding_window=None)
    fixed_biases = dict(bias=False, qkv_bias=True)
    window_key = True

    def claims(self, cfg: ModelConfig, recorded: str | None) -> bool:
        return recorded == self.model_type and cfg.qkv_bias and not cfg.bias

    def sliding_window(self, get: Callable[..., Any], source: str) -> int | None:
        """Qwen2 stores a window but uses it only when asked to, and only on layers >= max_window_layers
        (4.x), spelled out per layer in 5.x's layer_types: lmforge takes it when every layer slides."""
        uses_window = get("use_sliding_window") or "sliding_attention" in (get("layer_types") or ())
        if not uses_window:
            return None
        window = get("sliding_window")
        all_sliding = set(get("layer_types") or ()) == {"sliding_attention"} or get("max_window_layers") == 0
        if window is not None and not all_sliding:
            raise LmforgeError(f"{source}: sliding_window on some layers only (max_window_layers) is not supported")
        return window
