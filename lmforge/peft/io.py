"""Adapter directories: `adapter_config.json` + `adapter_model.safetensors`, Hugging Face PEFT's layout.

Every method writes this layout (`write_adapter_dir` / `read_adapter_config`); LoRA/DoRA here, prompt and
prefix tuning in `prompt.py` / `prefix.py` (PEFT's own formats), bottleneck adapters in `adapter.py`
(an lmforge peft_type: PEFT has no such method).

The files are PEFT's own, so an adapter trained here loads with `PeftModel.from_pretrained` on the
HF LLaMA model `lmforge convert to-hf` writes, and a PEFT-trained adapter loads here. Tensor keys are
PEFT's: `base_model.model.{HF module}.lora_A.weight` (the HF module names come from `lora_targets`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.files import atomic_write, atomic_write_json, read_json_object
from lmforge.model.io import load_weights
from lmforge.model.transformer import Transformer
from lmforge.peft.lora import (
    LoraConfig,
    apply_lora,
    delete_adapter,
    load_lora_state_dict,
    lora_state_dict,
    lora_targets,
)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# PEFT options that change what the tensors mean when set (truthy): such adapters are refused, not misread.
UNSUPPORTED = ("fan_in_fan_out", "lora_bias", "modules_to_save", "layers_to_transform",
               "layers_pattern", "rank_pattern", "alpha_pattern", "use_qalora")


def peft_key_map(model: Transformer, cfg: LoraConfig) -> dict[str, str]:
    """lmforge adapter key (`lora_state_dict`) -> PEFT key, for every tensor `cfg` creates."""
    out = {}
    for t in lora_targets(model, cfg.targets):
        for matrix in ("lora_A", "lora_B"):
            out[f"{t.module}.{t.part}.{matrix}.weight"] = f"{PEFT_PREFIX}{t.hf_module}.{matrix}.weight"
        if cfg.dora:
            out[f"{t.module}.{t.part}.lora_magnitude"] = f"{PEFT_PREFIX}{t.hf_module}.lora_magnitude_vector"
    return out


def peft_config(cfg: LoraConfig) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": list(cfg.targets),
        "use_rslora": cfg.rslora, "use_dora": cfg.dora, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def lora_config_from_peft(data: dict[str, Any], source: str) -> LoraConfig:
    """LoraConfig from an `adapter_config.json` dict; options lmforge cannot honour raise one line."""
    if data.get("peft_type") != "LORA":
        raise LmforgeError(f"{source}: peft_type {data.get('peft_type')!r} is not supported (only 'LORA')")
    if data.get("bias", "none") != "none":
        raise LmforgeError(f"{source}: bias {data['bias']!r} is not supported (only 'none')")
    for key in UNSUPPORTED:
        if data.get(key):
            raise LmforgeError(f"{source}: {key}={data[key]!r} is not supported")
    require_fields(data, ("r", "lora_alpha", "target_modules"), source)
    targets = data["target_modules"]
    if not isinstance(targets, list):
        raise LmforgeError(f"{source}: target_modules must be a list of module names, got {targets!r}")
    values = dict(r=data["r"], alpha=data["lora_alpha"], dropout=data.get("lora_dropout", 0.0),
                  targets=list(targets), rslora=bool(data.get("use_rslora", False)),
                  dora=bool(data.get("use_dora", False)))
    try:
        return from_dict(LoraConfig, values, "lora.")
    except ConfigError as e:
        raise LmforgeError(f"{source}: {e}") from None


def write_adapter_dir(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write the two files atomically; tensors are copied contiguous (views of one storage are refused)."""
    directory = Path(directory)
    tensors = {k: v.detach().to(copy=True).contiguous() for k, v in tensors.items()}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / ADAPTER_WEIGHTS_NAME,
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(directory / ADAPTER_CONFIG_NAME, config)
    return directory


def read_adapter_config(directory: str | Path) -> tuple[dict[str, Any], Path]:
    """(adapter_config.json as a dict, its path); one line when the directory is not an adapter directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LmforgeError(f"adapter directory not found: {directory}")
    path = directory / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise LmforgeError(f"{directory}: not an adapter directory (no {ADAPTER_CONFIG_NAME})")
    return read_json_object(path), path


def require_fields(data: dict[str, Any], keys: tuple[str, ...], source: Path | str) -> None:
    for key in keys:
        if key not in data:
            raise LmforgeError(f"{source}: missing required field '{key}'")


def save_adapter(model: Transformer, directory: str | Path, cfg: LoraConfig,
                 adapter_name: str = "default") -> Path:
    """Write adapter `adapter_name` as a PEFT LoRA directory; `cfg` must be the config it was applied with."""
    directory = Path(directory)
    state = lora_state_dict(model, adapter_name)
    if not state:
        raise LmforgeError(f"the model has no LoRA adapter named '{adapter_name}'")
    keys = peft_key_map(model, cfg)
    if set(keys) != set(state):
        adapted = sorted({k.split(".")[-3] for k in state if k.endswith(".weight")})
        raise LmforgeError(f"adapter '{adapter_name}' was not made with this LoraConfig "
                           f"(targets {cfg.targets}, but it adapts {adapted})")
    for key, tensor in state.items():
        if tensor.dim() == 1:  # a DoRA magnitude
            continue
        rank = tensor.shape[0] if ".lora_A." in key else tensor.shape[1]
        if rank != cfg.r:
            raise LmforgeError(f"adapter '{adapter_name}' has rank {rank}, but the LoraConfig says r={cfg.r}")
    return write_adapter_dir(directory, {keys[k]: v for k, v in state.items()}, peft_config(cfg))


def load_adapter(model: Transformer, directory: str | Path, adapter_name: str = "default") -> LoraConfig:
    """Add the PEFT LoRA adapter in `directory` to `model` as `adapter_name` (active); returns its config.

    On any mismatch the model is left as it was and one LmforgeError line names the file and tensor.
    """
    data, config_path = read_adapter_config(directory)
    weights_path = Path(directory) / ADAPTER_WEIGHTS_NAME
    cfg = lora_config_from_peft(data, str(config_path))
    peft_state = load_weights(weights_path)
    ours_of = {peft: ours for ours, peft in peft_key_map(model, cfg).items()}
    unknown = sorted(k for k in peft_state if k not in ours_of)
    if unknown:
        raise LmforgeError(f"{weights_path}: tensors that are not LoRA weights of this model's "
                           f"{', '.join(cfg.targets)} modules: {unknown[:3]}")
    state = {ours_of[k]: v for k, v in peft_state.items()}
    apply_lora(model, cfg, adapter_name)
    try:
        load_lora_state_dict(model, state, adapter_name, source=str(weights_path))
    except LmforgeError:
        delete_adapter(model, adapter_name)
        raise
    return cfg
