"""`lmforge convert from-hf / to-hf`: an HF model directory <-> an lmforge model directory, for every family
in the registry. The family's adapter does the naming; this module does the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError
from lmforge.core.files import read_json_object
from lmforge.model.encdec import build_model
from lmforge.model.hf.io import (
    DTYPES,
    TOKEN_ID_KEYS,
    check_dtype,
    copy_tokenizer_files,
    read_hf_weights,
    token_ids_of,
    write_hf_dir,
)
from lmforge.model.hf.registry import ADAPTERS, adapter_for, export_adapter, hf_config_from_model
from lmforge.model.io import CONFIG_NAME, WEIGHTS_NAME, load_weights, read_model_config, save_model

FAMILY_CHOICES = ("auto", *ADAPTERS)


def from_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert an HF directory of any registered family (safetensors only) into an lmforge model directory."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise LmforgeError(f"HF model directory not found: {hf_dir}")
    config_path = hf_dir / CONFIG_NAME
    if not config_path.is_file():
        raise LmforgeError(f"{hf_dir}: no {CONFIG_NAME} (is this a Hugging Face model directory?)")
    hf = read_json_object(config_path)
    adapter = adapter_for(hf.get("model_type"), str(config_path))
    cfg = adapter.config_from_hf(hf, str(config_path))
    hf_state = read_hf_weights(hf_dir)
    cfg = adapter.fit_weights(cfg, hf_state)
    try:
        state = adapter.state_dict_from_hf(hf_state, cfg, hf)
    except LmforgeError as e:
        raise LmforgeError(f"{hf_dir}: {e}") from None
    del hf_state
    with torch.device("meta"):  # no init work and no second copy of the weights: they are assigned
        model = build_model(cfg)
    model.load_state_dict(state, strict=False, assign=True)  # complete: state_dict_from_hf checked it
    # bos/eos/pad ids have no place in ModelConfig; kept beside it so `to_hf` can write them back.
    source = {"model_type": adapter.model_type, "source": str(hf_dir), **adapter.record(hf),
              **{k: hf.get(k) for k in TOKEN_ID_KEYS}}
    out_dir = save_model(model, out_dir, extra={"hf": source})
    copy_tokenizer_files(hf_dir, out_dir)
    return out_dir


def to_hf(checkpoint_dir: str | Path, hf_dir: str | Path, dtype: str = "float32", family: str = "auto") -> Path:
    """Write an lmforge model directory as an HF directory `from_pretrained` loads: `family` (a registered
    `model_type`) or, with "auto", the first family that claims its config and the family it was imported from."""
    checkpoint_dir, hf_dir = Path(checkpoint_dir), Path(hf_dir)
    check_dtype(dtype)
    if family not in FAMILY_CHOICES:
        raise LmforgeError(f"family '{family}' is not one of {', '.join(FAMILY_CHOICES)}")
    cfg = read_model_config(checkpoint_dir)
    if cfg.prefix_lm:
        raise LmforgeError(f"{checkpoint_dir}: model.prefix_lm=true cannot be exported: transformers reads every "
                           "prompt causally, so its outputs would differ from lmforge's")
    meta: dict[str, Any] = read_json_object(checkpoint_dir / CONFIG_NAME).get("hf") or {}
    adapter = export_adapter(cfg, meta.get("model_type")) if family == "auto" else ADAPTERS[family]
    token_ids = token_ids_of(checkpoint_dir)
    hf_cfg = hf_config_from_model(cfg, dtype, token_ids, adapter.model_type, meta)
    try:
        hf_state = adapter.state_dict_to_hf(load_weights(checkpoint_dir / WEIGHTS_NAME), cfg, meta)
    except LmforgeError as e:
        raise LmforgeError(f"{checkpoint_dir}: {e}") from None
    # copy=True: split views share storage, which safetensors refuses to write.
    hf_state = {k: v.to(torch.float32 if k.endswith(adapter.fp32_suffixes) else DTYPES[dtype], copy=True)
                .contiguous() for k, v in hf_state.items()}
    return write_hf_dir(hf_dir, hf_state, hf_cfg, token_ids, checkpoint_dir)


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
    family: Literal[FAMILY_CHOICES] = option(  # type: ignore[valid-type]
        "auto", "HF model class; auto picks it from the config (DeepSeek-V3 for MLA/MoE, T5 for encdec, GPT-2 for "
                "learned positions + LayerNorm, Mistral for a sliding window, else the imported family or LLaMA)")


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
