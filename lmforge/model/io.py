"""Model directories: `config.json` (the ModelConfig under "model") + `model.safetensors`.

Weights are read only from safetensors (no pickle). A directory written here loads anywhere
lmforge runs: generate, eval, convert, and every post-training stage.
"""

from __future__ import annotations

import json
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


def check_state(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, torch.Tensor]:
    """One clear line for missing, unexpected or mis-shaped tensors (`shapes`: name -> shape of what is about to
    be loaded); returns the model's own state dict."""
    own = model.state_dict()
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    missing = [k for k in own if k not in shapes and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in shapes if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}"
                         + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""))
        raise LmforgeError(f"{source}: weights do not match the model config: {'; '.join(parts)}")
    for k, shape in shapes.items():
        if tuple(own[k].shape) != tuple(shape):
            raise LmforgeError(f"{source}: tensor '{k}' has shape {tuple(shape)}, the config expects "
                               f"{tuple(own[k].shape)}")
    return own


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one clear line for missing, unexpected or mis-shaped tensors."""
    check_state(model, {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict(state, strict=False)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def load_file_into(model: torch.nn.Module, path: str | Path) -> None:
    """`load_into` from a safetensors file, each tensor read straight into the model's own storage (through a
    staging tensor only when the dtypes differ): the load never holds a second copy of the weights, in anonymous
    memory or in a mapping of the file (a 0.5B fp32 model would otherwise peak at 4 GB instead of 2)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"weights not found: {path}")
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n <= 100_000_000 else None
            if not isinstance(header, dict):
                raise ValueError("no valid header")
            header.pop("__metadata__", None)
            own = check_state(model, {k: tuple(v["shape"]) for k, v in header.items()}, str(path))
            for k, v in header.items():
                dtype, (begin, stop), dst = SAFETENSORS_DTYPES[v["dtype"]], v["data_offsets"], own[k]
                staging = dst if dst.dtype == dtype and dst.is_contiguous() else torch.empty(dst.shape, dtype=dtype)
                raw = staging.detach().reshape(-1).view(torch.uint8).numpy()
                if stop - begin != raw.size:
                    raise ValueError(f"tensor '{k}' holds {stop - begin} bytes, its shape and dtype need "
                                     f"{raw.size}")
                f.seek(8 + n + begin)
                if f.readinto(raw) != raw.size:
                    raise ValueError(f"tensor '{k}' is cut short")
                if staging is not dst:
                    with torch.no_grad():
                        dst.copy_(staging)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LmforgeError(f"{path}: not a readable safetensors file ({e})") from None


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """A model directory as the module its config names (decoder-only `Transformer` or `EncoderDecoder`)."""

    directory = Path(directory)
    model = build_model(read_model_config(directory))
    load_file_into(model, directory / WEIGHTS_NAME)
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval()
