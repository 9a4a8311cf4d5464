"""Hugging Face interop: `lmforge convert from-hf / to-hf` for the LLaMA family (LLaMA, Mistral with its
sliding window, Qwen2 with q/k/v biases) here, GPT-2 (`hf_gpt2`) and T5 (`hf_t5`) through adapters.

All HF naming lives here, so the model core never learns it (torchtitan's `state_dict_adapter`).
The mapping is exact, not approximate: lmforge's RoPE uses HF's half-split (rotate_half) layout,
so q/k rows need no permutation, and the fused tensors are plain row concatenations,
`attn.qkv = [q_proj; k_proj; v_proj]` and `mlp.up = [gate_proj; up_proj]`. A bias one side has and
the other lacks is zero on the lacking side, which changes no output. Only safetensors are read:
pickle checkpoints (`pytorch_model.bin`) can run code when loaded and are refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lmforge.core.config import from_dict, option
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.files import atomic_write, atomic_write_json, read_json_object
from lmforge.model import hf_gpt2, hf_t5
from lmforge.model.config import ModelConfig
from lmforge.model.encdec import build_model
from lmforge.model.io import CONFIG_NAME, WEIGHTS_NAME, load_weights, read_model_config, save_model
from lmforge.model.positions import yarn_mscale

HF_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Values HF's config classes assume when config.json leaves a key out (save_pretrained drops defaults).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                  tie_word_embeddings=False, attention_bias=False, mlp_bias=False, sliding_window=None),
    "mistral": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096 * 32,
                    tie_word_embeddings=False, sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
                  tie_word_embeddings=False, sliding_window=None),
}
ADAPTERS = {"gpt2": hf_gpt2, "t5": hf_t5}
LLAMA_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
FAMILIES = (*LLAMA_ARCHITECTURES, *ADAPTERS)
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


# ----------------------------------------------------------------------------------------------
# configs


def model_config_from_hf(hf: dict[str, Any], source: str = "HF config") -> ModelConfig:
    """ModelConfig for a LLaMA/Mistral/Qwen2 `config.json` dict; anything lmforge would compute
    differently (longrope, sliding windows, another activation) raises instead of converting."""
    family = hf.get("model_type")
    if family in ADAPTERS:
        return ADAPTERS[family].config_from_hf(hf, source)
    if family not in FAMILY_DEFAULTS:
        raise LmforgeError(f"{source}: model_type '{family}' is not supported; supported: {', '.join(FAMILIES)}")
    # An explicit null means "default" for every key but sliding_window, where it means "no window".
    given = {k: v for k, v in hf.items() if v is not None or k == "sliding_window"}
    get = {**FAMILY_DEFAULTS[family], **given}.get
    for key in REQUIRED_KEYS:
        if get(key) is None:
            raise LmforgeError(f"{source}: missing required field '{key}'")
    if get("hidden_act", "silu") != "silu":
        raise LmforgeError(f"{source}: hidden_act '{get('hidden_act')}' is not supported (LLaMA uses silu)")
    max_len = int(get("max_position_embeddings"))
    window = get("sliding_window")
    uses_window = get("use_sliding_window") or "sliding_attention" in (get("layer_types") or ())
    if family == "qwen2" and not uses_window:
        window = None  # Qwen2 stores a window but uses it only when asked to
    # Qwen2 slides only layers >= max_window_layers (4.x), spelled out per layer in 5.x's layer_types
    all_sliding = set(get("layer_types") or ()) == {"sliding_attention"} or get("max_window_layers") == 0
    if family == "qwen2" and window is not None and not all_sliding:
        raise LmforgeError(f"{source}: sliding_window on some layers only (max_window_layers) is not supported")
    if window is not None and window >= max_len:
        window = None  # a window as long as the context changes nothing
    heads = int(get("num_attention_heads"))
    # LLaMA's attention_bias puts a bias on q, k, v and o: lmforge spells an o bias as `bias` (which
    # also biases the MLP, loaded as zeros when HF has none). Qwen2 biases q/k/v only.
    qkv_only = family == "qwen2"
    values = dict(
        vocab_size=get("vocab_size"), d_model=get("hidden_size"), n_layers=get("num_hidden_layers"),
        n_heads=heads, n_kv_heads=get("num_key_value_heads", heads),
        head_dim=get("head_dim") or int(get("hidden_size")) // heads, d_ff=get("intermediate_size"),
        max_seq_len=max_len, norm="rmsnorm", norm_eps=get("rms_norm_eps"), norm_placement="pre", mlp="swiglu",
        position="rope", **rope_from_hf(hf, get("rope_theta"), max_len, source),
        tie_embeddings=bool(get("tie_word_embeddings")), qkv_bias=qkv_only,
        bias=bool(get("mlp_bias")) or (bool(get("attention_bias")) and not qkv_only),
        init_std=get("initializer_range", 0.02), sliding_window=window or 0,
    )
    try:
        return from_dict(ModelConfig, values, "model.")
    except ConfigError as e:
        raise LmforgeError(f"{source}: {e}") from None


# HF rope_type -> the rope_parameters keys it reads beside rope_type/rope_theta/factor, and the ModelConfig
# field each one fills. The names of the types are the same on both sides.
ROPE_KEYS: dict[str, dict[str, str]] = {
    "default": {}, "linear": {}, "dynamic": {},
    "yarn": {"original_max_position_embeddings": "rope_original_max_seq_len", "beta_fast": "rope_beta_fast",
             "beta_slow": "rope_beta_slow"},
    "llama3": {"original_max_position_embeddings": "rope_original_max_seq_len",
               "low_freq_factor": "rope_low_freq_factor", "high_freq_factor": "rope_high_freq_factor"},
}


def rope_from_hf(hf: dict[str, Any], default_theta: float, max_len: int,
                 source: str = "HF config") -> dict[str, Any]:
    """ModelConfig `rope_*` values from transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`) keys, read as HF 5.x reads them (`rope_scaling` wins, llama3/yarn's original context
    defaults to max_position_embeddings). A type or key lmforge does not compute (longrope, YaRN's mscale,
    partial rotary, ...) raises rather than convert to different positions."""
    params = hf.get("rope_parameters") or {}
    key, spec = ("rope_scaling", hf["rope_scaling"]) if hf.get("rope_scaling") else ("rope_parameters", params)
    rope_type = spec.get("rope_type", spec.get("type", "default")) if isinstance(spec, dict) else None

    def refuse(why: str) -> LmforgeError:
        return LmforgeError(f"{source}: {key} {json.dumps(spec)} is not supported yet ({why})")

    if rope_type not in ROPE_KEYS or any(isinstance(v, dict) for v in spec.values()):
        raise refuse(f"RoPE types: {', '.join(ROPE_KEYS)}")
    theta = spec.get("rope_theta", params.get("rope_theta", default_theta))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "default":
        return out
    fields = ROPE_KEYS[rope_type]
    extra = dict(spec)
    for known in ("rope_type", "type", "rope_theta", "factor", *fields):
        extra.pop(known, None)
    if extra.get("partial_rotary_factor", 1.0) == 1.0:
        extra.pop("partial_rotary_factor", None)
    if rope_type == "dynamic":  # HF's dynamic NTK measures from max_position_embeddings and ignores this
        extra.pop("original_max_position_embeddings", None)
    original = hf.get("original_max_position_embeddings") or spec.get("original_max_position_embeddings") or max_len
    factor = spec.get("factor") or (max_len / original if rope_type == "yarn" else None)
    if rope_type == "yarn":
        if extra.get("truncate", True) is True:
            extra.pop("truncate", None)
        if "attention_factor" in extra and extra["attention_factor"] == yarn_mscale(float(factor)):
            extra.pop("attention_factor")
    if extra:
        raise refuse(f"key '{sorted(extra)[0]}'")
    if factor is None:
        raise refuse("no 'factor'")
    out.update(rope_scaling=rope_type, rope_factor=float(factor))
    for hf_key, field in fields.items():
        if hf_key in spec:
            out[field] = spec[hf_key]
    if "rope_original_max_seq_len" in fields.values():
        out["rope_original_max_seq_len"] = int(original)
    return out


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """`rope_parameters` (5.x), `rope_scaling` (4.x) and `max_position_embeddings` for cfg's RoPE. HF's
    dynamic NTK takes max_position_embeddings as the original context, so that is what it gets."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    max_len = cfg.max_seq_len
    if cfg.rope_scaling != "none":
        params.update(rope_type=cfg.rope_scaling, factor=cfg.rope_factor)
        original = cfg.rope_original_max_seq_len or cfg.max_seq_len
        for hf_key, field in ROPE_KEYS[cfg.rope_scaling].items():
            params[hf_key] = original if field == "rope_original_max_seq_len" else getattr(cfg, field)
        if cfg.rope_scaling == "dynamic":
            max_len = original
    scaling = {k: v for k, v in params.items() if k != "rope_theta"} if cfg.rope_scaling != "none" else None
    return {"max_position_embeddings": max_len, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
            "rope_parameters": params}


def hf_family(cfg: ModelConfig, recorded: str | None = None) -> str:
    """The HF model_type a ModelConfig exports as: T5 for encoder-decoders, GPT-2 for learned positions with
    LayerNorm, Mistral for a sliding window, else the family it was imported from (Qwen2/Mistral) or LLaMA."""
    if cfg.arch == "encdec":
        return "t5"
    if cfg.position == "learned" and cfg.norm == "layernorm":
        return "gpt2"
    if cfg.sliding_window:
        return "mistral"
    if recorded == "mistral" or (recorded == "qwen2" and cfg.qkv_bias and not cfg.bias):
        return recorded
    return "llama"


def check_llama_compatible(cfg: ModelConfig, family: str = "llama") -> None:
    """Raise naming the first ModelConfig field that the LLaMA-family class cannot express."""
    arch = LLAMA_ARCHITECTURES[family]
    wanted = dict(norm="rmsnorm", norm_placement="pre", mlp="swiglu", position="rope", arch="decoder",
                  attn_scale=0.0, output_scale=1.0)
    if family != "mistral":
        wanted["sliding_window"] = 0
    if family != "llama":  # Qwen2 biases q/k/v only, Mistral nothing
        wanted.update(bias=False, qkv_bias=family == "qwen2")
    for field, value in wanted.items():
        if getattr(cfg, field) != value:
            raise LmforgeError(f"model.{field}={getattr(cfg, field)!r} cannot be exported as "
                               f"{arch} (it needs {field}={value!r})")
    if cfg.vocab_size <= 0:
        raise LmforgeError(f"model.vocab_size must be positive to export, got {cfg.vocab_size}")


def check_compatible(cfg: ModelConfig, family: str) -> None:
    if family in ADAPTERS:
        ADAPTERS[family].check(cfg)
    else:
        check_llama_compatible(cfg, family)


def hf_config_from_model(cfg: ModelConfig, torch_dtype: str = "float32",
                         token_ids: dict[str, Any] | None = None, family: str | None = None) -> dict[str, Any]:
    """A `config.json` dict for `family` (default: `hf_family(cfg)`); read by transformers 4.x and 5.x alike
    (both spellings of the dtype and RoPE keys). `token_ids` sets bos/eos/pad ids; unknown ones are written
    as null so HF does not assume LLaMA's 1/2."""
    family = family or hf_family(cfg)
    check_compatible(cfg, family)
    if torch_dtype not in DTYPES:
        raise LmforgeError(f"dtype '{torch_dtype}' is not one of {', '.join(DTYPES)}")
    ids = {k: (token_ids or {}).get(k) for k in TOKEN_ID_KEYS}
    if family in ADAPTERS:
        ids = {k: v for k, v in ids.items() if v is not None}  # keep the family's own defaults (T5: pad 0)
        return {**ADAPTERS[family].config_to_hf(cfg), **ids, "dtype": torch_dtype, "torch_dtype": torch_dtype}
    window = {"sliding_window": cfg.sliding_window or None} if family != "llama" else {}
    return {
        "architectures": [LLAMA_ARCHITECTURES[family]], "model_type": family, **window,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, **rope_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.bias or cfg.qkv_bias,
        "mlp_bias": cfg.bias, "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        **ids, "dtype": torch_dtype, "torch_dtype": torch_dtype,
    }


# ----------------------------------------------------------------------------------------------
# weights


def module_map(cfg: ModelConfig, family: str | None = None) -> list[tuple[str, list[tuple[str, int]]]]:
    """(lmforge module, [(HF module, rows), ...]): the HF tensors stacked along dim 0 make the lmforge one."""
    family = family or hf_family(cfg)
    if family in ADAPTERS:
        return ADAPTERS[family].module_map(cfg)
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


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an lmforge model directory holds for `cfg`, read off a meta-device model (no memory)."""
    with torch.device("meta"):
        model = build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig,
                       family: str | None = None) -> dict[str, torch.Tensor]:
    """lmforge tensors from HF tensors of `family`; a missing, extra or mis-shaped tensor raises."""
    family = family or hf_family(cfg)
    adapter = ADAPTERS.get(family)
    if adapter is not None:
        hf_state = adapter.normalize_state(hf_state)
    shapes = expected_shapes(cfg)
    state, used = {}, set()
    for ours, theirs in module_map(cfg, family):
        for suffix in ("weight", "bias"):
            key = f"{ours}.{suffix}"
            if key not in shapes:
                continue
            parts = []
            for name, rows in theirs:
                hf_key = f"{name}.{suffix}"
                if hf_key in hf_state:
                    flip = suffix == "weight" and adapter is not None and adapter.transposed(name)
                    parts.append(hf_state[hf_key].t() if flip else hf_state[hf_key])
                    used.add(hf_key)
                elif suffix == "bias":  # a bias HF does not have is zero
                    parts.append(torch.zeros(rows, dtype=hf_state[f"{name}.weight"].dtype))
                else:
                    raise LmforgeError(f"HF weights have no tensor '{hf_key}' (the config expects it)")
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if tuple(tensor.shape) != shapes[key]:
                detail = ", ".join(f"{n}.{suffix} {tuple(p.shape)}" for (n, _), p in zip(theirs, parts))
                raise LmforgeError(f"HF tensor shapes do not match the config: {detail}; expected {key} "
                                   f"{shapes[key]} in total")
            state[key] = tensor
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()  # some tied checkpoints store the copy
    unexpected = sorted(k for k in hf_state if k not in used and k not in ignorable
                        and not k.endswith("rotary_emb.inv_freq")
                        and not (k.endswith(".bias") and not hf_state[k].any()))  # a zero bias is no bias
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise LmforgeError(f"HF weights have tensors the config does not explain: {unexpected[:3]}{more}")
    return state


def state_dict_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig,
                     family: str | None = None) -> dict[str, torch.Tensor]:
    """HF tensors of `family` (default `hf_family(cfg)`) from lmforge ones (views into `state`; clone before
    saving)."""
    family = family or hf_family(cfg)
    check_compatible(cfg, family)
    adapter = ADAPTERS.get(family)
    shapes = expected_shapes(cfg)
    for key, shape in shapes.items():
        if key not in state:
            raise LmforgeError(f"checkpoint has no tensor '{key}' (the config expects it)")
        if tuple(state[key].shape) != shape:
            raise LmforgeError(f"checkpoint tensor '{key}' has shape {tuple(state[key].shape)}, the config "
                               f"expects {shape}")
    unexpected = sorted(set(state) - set(shapes) - {"lm_head.weight"})
    if unexpected:
        raise LmforgeError(f"checkpoint has tensors the config does not explain: {unexpected[:3]}")
    # LLaMA's attention_bias covers q, k, v and o: with lmforge's qkv_bias alone, o_proj gets a zero bias.
    hf_bias = {"self_attn": cfg.bias or cfg.qkv_bias, "mlp": cfg.bias} if family == "llama" else {}
    hf_state = {}
    for ours, theirs in module_map(cfg, family):
        weights = state[f"{ours}.weight"].split([rows for _, rows in theirs], dim=0)
        bias = state.get(f"{ours}.bias")
        biases = bias.split([rows for _, rows in theirs], dim=0) if bias is not None else [None] * len(theirs)
        for (name, rows), w, b in zip(theirs, weights, biases):
            hf_state[f"{name}.weight"] = w.t() if adapter is not None and adapter.transposed(name) else w
            wants_bias = any(f".{group}." in name and on for group, on in hf_bias.items())
            if b is not None or wants_bias:
                hf_state[f"{name}.bias"] = b if b is not None else torch.zeros(rows, dtype=w.dtype)
    return hf_state


# ----------------------------------------------------------------------------------------------
# directories


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards named by `model.safetensors.index.json`."""
    index = hf_dir / HF_INDEX_NAME
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LmforgeError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (hf_dir / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    elif any((hf_dir / name).is_file() for name in PICKLE_NAMES):
        raise LmforgeError(f"{hf_dir}: only a pickle checkpoint (pytorch_model.bin) is there; pickle "
                           "checkpoints are refused (loading one can run code): convert it to safetensors")
    else:
        raise LmforgeError(f"{hf_dir}: no {WEIGHTS_NAME} or {HF_INDEX_NAME}")
    state: dict[str, torch.Tensor] = {}
    for name in tqdm(files, desc="reading shards", unit="shard", disable=len(files) < 2):
        path = hf_dir / name
        if not path.is_file():
            raise LmforgeError(f"{index}: names shard '{name}', which is missing")
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise LmforgeError(f"{path}: not a readable safetensors file ({e})") from None
    return state


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            atomic_write(dst / name, lambda tmp, name=name: shutil.copyfile(src / name, tmp))
            copied.append(name)
    return copied


def from_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a HF LLaMA/Mistral/Qwen2 directory (safetensors only) into an lmforge model directory."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise LmforgeError(f"HF model directory not found: {hf_dir}")
    config_path = hf_dir / CONFIG_NAME
    if not config_path.is_file():
        raise LmforgeError(f"{hf_dir}: no {CONFIG_NAME} (is this a Hugging Face model directory?)")
    hf = read_json_object(config_path)
    if hf.get("model_type") == "deepseek_v3":  # MLA + DeepSeekMoE (+ MTP): lmforge.model.hf_deepseek
        from lmforge.model.hf_deepseek import from_hf as from_hf_deepseek

        return from_hf_deepseek(hf_dir, out_dir, hf)
    cfg = model_config_from_hf(hf, source=str(config_path))
    hf_state = read_hf_weights(hf_dir)
    family = hf["model_type"]
    if family == "t5" and "lm_head.weight" in hf_state and "shared.weight" in hf_state \
            and not torch.equal(hf_state["lm_head.weight"], hf_state["shared.weight"]):
        cfg = dataclasses.replace(cfg, tie_embeddings=False)  # transformers 5 calls every T5 tied; v1.1 is not
    try:
        state = state_dict_from_hf(hf_state, cfg, family)
    except LmforgeError as e:
        raise LmforgeError(f"{hf_dir}: {e}") from None
    del hf_state
    with torch.device("meta"):  # no init work and no second copy of the weights: they are assigned
        model = build_model(cfg)
    model.load_state_dict(state, strict=False, assign=True)  # complete: state_dict_from_hf checked it
    # bos/eos/pad ids have no place in ModelConfig; kept beside it so `to_hf` can write them back.
    source = {"model_type": hf["model_type"], "source": str(hf_dir), **{k: hf.get(k) for k in TOKEN_ID_KEYS}}
    out_dir = save_model(model, out_dir, extra={"hf": source})
    copy_tokenizer_files(hf_dir, out_dir)
    return out_dir


def token_ids_of(checkpoint_dir: Path) -> dict[str, Any]:
    """bos/eos/pad ids `from_hf` recorded, else tokenizer_config.json's tokens found in tokenizer.json."""
    ids = read_json_object(checkpoint_dir / CONFIG_NAME).get("hf") or {}
    ids = {k: ids[k] for k in TOKEN_ID_KEYS if ids.get(k) is not None}
    tok_cfg, tok = checkpoint_dir / "tokenizer_config.json", checkpoint_dir / "tokenizer.json"
    if tok_cfg.is_file() and tok.is_file():
        vocab = {t["content"]: t["id"] for t in read_json_object(tok).get("added_tokens", [])}
        for key, value in read_json_object(tok_cfg).items():
            content = value.get("content") if isinstance(value, dict) else value
            id_key = f"{key}_id"
            if id_key in TOKEN_ID_KEYS and id_key not in ids and content in vocab:
                ids[id_key] = vocab[content]
    return ids


def to_hf(checkpoint_dir: str | Path, hf_dir: str | Path, dtype: str = "float32", family: str = "auto") -> Path:
    """Write an lmforge model directory as a HF directory `from_pretrained` loads: `family` (llama, mistral,
    qwen2, gpt2, t5) or, with "auto", `hf_family` of its config and the family it was imported from."""
    checkpoint_dir, hf_dir = Path(checkpoint_dir), Path(hf_dir)
    if dtype not in DTYPES:
        raise LmforgeError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    from lmforge.model.hf_deepseek import is_deepseek_checkpoint
    from lmforge.model.hf_deepseek import to_hf as to_hf_deepseek

    if family == "auto" and (checkpoint_dir / CONFIG_NAME).is_file() and is_deepseek_checkpoint(checkpoint_dir):
        return to_hf_deepseek(checkpoint_dir, hf_dir, dtype)  # MLA/MoE models export as DeepseekV3ForCausalLM
    cfg = read_model_config(checkpoint_dir)
    token_ids = token_ids_of(checkpoint_dir)
    if family == "auto":
        family = hf_family(cfg, (read_json_object(checkpoint_dir / CONFIG_NAME).get("hf") or {}).get("model_type"))
    elif family not in FAMILIES:
        raise LmforgeError(f"family '{family}' is not one of auto, {', '.join(FAMILIES)}")
    hf_cfg = hf_config_from_model(cfg, dtype, token_ids, family)
    try:
        hf_state = state_dict_to_hf(load_weights(checkpoint_dir / WEIGHTS_NAME), cfg, family)
    except LmforgeError as e:
        raise LmforgeError(f"{checkpoint_dir}: {e}") from None
    # copy=True: split views share storage, which safetensors refuses to write.
    hf_state = {k: v.to(DTYPES[dtype], copy=True).contiguous() for k, v in hf_state.items()}
    return write_hf_dir(hf_dir, hf_state, hf_cfg, token_ids, checkpoint_dir)


def write_hf_dir(hf_dir: Path, hf_state: dict[str, torch.Tensor], hf_cfg: dict[str, Any],
                 token_ids: dict[str, Any], checkpoint_dir: Path) -> Path:
    """An HF model directory: safetensors weights, config.json, generation_config.json, the tokenizer files."""
    hf_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(hf_dir / WEIGHTS_NAME, lambda tmp: save_file(hf_state, tmp, metadata={"format": "pt"}))
    atomic_write_json(hf_dir / CONFIG_NAME, hf_cfg)
    generation = {k: token_ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in token_ids}
    if generation:
        atomic_write_json(hf_dir / "generation_config.json", generation)
    copy_tokenizer_files(checkpoint_dir, hf_dir)
    return hf_dir


# ----------------------------------------------------------------------------------------------
# commands


@dataclass
class FromHFConfig:
    hf_dir: str = option(help="Hugging Face model directory (config.json + safetensors)", positional=True)
    out_dir: str = option(help="lmforge model directory to write", positional=True)


@dataclass
class ToHFConfig:
    checkpoint: str = option(help="lmforge model directory (config.json + model.safetensors)",
                             positional=True)
    hf_dir: str = option(help="directory to write the HF model files into", positional=True)
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype of the written weights")
    family: Literal["auto", "llama", "mistral", "qwen2", "gpt2", "t5"] = option(
        "auto", "HF model class; auto picks it from the config (T5 for encdec, GPT-2 for learned positions + "
                "LayerNorm, Mistral for a sliding window, else the imported family or LLaMA)")


def from_hf_cmd(cfg: FromHFConfig) -> int:
    out = from_hf(cfg.hf_dir, cfg.out_dir)
    model_cfg = read_model_config(out)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in build_model(model_cfg).parameters())
    print(f"wrote {out} ({model_cfg.arch}, {model_cfg.n_layers} layers, d_model {model_cfg.d_model}, "
          f"{n_params / 1e6:.1f}M parameters)")
    return 0


def to_hf_cmd(cfg: ToHFConfig) -> int:
    out = to_hf(cfg.checkpoint, cfg.hf_dir, cfg.dtype, cfg.family)
    print(f"wrote {out} ({read_json_object(out / CONFIG_NAME)['architectures'][0]}, {cfg.dtype})")
    return 0
