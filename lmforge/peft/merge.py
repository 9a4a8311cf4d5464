"""`lmforge merge-adapter`: base model + LoRA/DoRA adapter -> one plain model directory.

The result loads, generates and converts (`convert to-hf`) like any checkpoint, with no adapter cost at
inference. Only weight-space methods merge: prompt/prefix tuning add positions and bottleneck adapters add a
nonlinear MLP, so those are refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.core.config import option
from lmforge.model.hf.io import copy_tokenizer_files
from lmforge.model.io import save_model
from lmforge.peft.config import load_trained, merge_adapter


@dataclass
class MergeAdapterConfig:
    checkpoint: str = option(help="base model directory (config.json + model.safetensors)")
    adapter: str = option(help="LoRA/DoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    output: str = option(help="model directory to write the merged model (and the base's tokenizer) into")


def merge_to_dir(checkpoint: str | Path, adapter: str | Path, output: str | Path) -> Path:
    """The base model `checkpoint` with the LoRA/DoRA `adapter` folded in, written to `output` with the base's
    tokenizer files: a plain model directory."""
    out = save_model(merge_adapter(load_trained(checkpoint, adapter)), output)
    copy_tokenizer_files(Path(checkpoint), out)
    return out


def merge_adapter_cmd(cfg: MergeAdapterConfig) -> int:
    out = merge_to_dir(cfg.checkpoint, cfg.adapter, cfg.output)
    print(f"wrote {out} (base {cfg.checkpoint} + adapter {cfg.adapter}, merged)")
    return 0
