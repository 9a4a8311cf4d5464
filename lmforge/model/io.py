"""Model directories: `config.json` (the ModelConfig under "model") + `model.safetensors`.

Weights are read only from safetensors (no pickle). A directory written here loads anywhere
lmforge runs: generate, eval, convert, and every post-training stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.core.config import ConfigError, from_dict, to_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write, atomic_write_json, read_json_object
from lmforge.model.config import ModelConfig
from lmforge.model.encdec import build_model
from lmforge.model.transformer import Transformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the tied LM head (safetensors refuses shared tensors) and contiguous."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model(model: Transformer, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write weights then config, each atomically; `extra` adds top-level keys to config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model_state_dict(model)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_NAME, {"model": to_dict(model.cfg), **(extra or {})})
    return directory


def read_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise LmforgeError(f"not a model directory (no {CONFIG_NAME}): {directory}")
    data = read_json_object(path)
    if "model" not in data:
        raise LmforgeError(f"{path}: no 'model' section (is this an lmforge checkpoint?)")
    cfg = dict(data["model"])
    cfg.pop("preset", None)  # the stored values are already resolved
    try:
        return from_dict(ModelConfig, cfg, "model.")
    except ConfigError as e:
        raise LmforgeError(f"{path}: {e}") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"weights not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"{path}: not a readable safetensors file ({e})") from None


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one clear line for missing, unexpected or mis-shaped tensors."""
    own = model.state_dict()
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    missing = [k for k in own if k not in state and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}"
                         + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""))
        raise LmforgeError(f"{source}: weights do not match the model config: {'; '.join(parts)}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise LmforgeError(f"{source}: tensor '{k}' has shape {tuple(v.shape)}, the config expects "
                               f"{tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """A model directory as the module its config names (decoder-only `Transformer` or `EncoderDecoder`)."""

    directory = Path(directory)
    model = build_model(read_model_config(directory))
    load_into(model, load_weights(directory / WEIGHTS_NAME), str(directory / WEIGHTS_NAME))
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval()
