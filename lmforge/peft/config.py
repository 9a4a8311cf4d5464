"""The `peft` section every fine-tuning recipe shares (`lmforge sft`, `dpo`, `grpo`, ...).

One entry point per direction keeps the trainers ignorant of which method is in use:
`apply_peft` before training (freezes the base, adds the trainable modules), `save_trained`
after it (adapter files for a PEFT method, a full model directory otherwise), `load_trained` to
get the result back for generation or the next stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from lmforge.config import option
from lmforge.errors import LmforgeError
from lmforge.model.io import load_model, save_model
from lmforge.model.transformer import Transformer
from lmforge.peft.io import ADAPTER_CONFIG_NAME, load_adapter, save_adapter
from lmforge.peft.lora import LoraConfig, apply_lora, count_parameters

PeftMethod = Literal["none", "lora"]


@dataclass
class PeftConfig:
    method: PeftMethod = option("none", "parameter-efficient method; none trains every weight")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA (method = lora)"})


def apply_peft(model: Transformer, cfg: PeftConfig) -> Transformer:
    """Prepare `model` for training under `cfg`, in place, and print trainable vs total parameters."""
    if cfg.method == "lora":
        apply_lora(model, cfg.lora)
    trainable, total = count_parameters(model)
    print(f"peft: method {cfg.method}, {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / max(total, 1):.2f}%)")
    return model


def save_trained(model: Transformer, cfg: PeftConfig, directory: str | Path) -> Path:
    """Write what training produced: PEFT adapter files for a PEFT method, else a full model directory."""
    if cfg.method == "lora":
        return save_adapter(model, directory, cfg.lora)
    return save_model(model, directory)


def load_trained(checkpoint: str | Path, adapter: str | Path | None = None,
                 device: str = "cpu") -> Transformer:
    """A model directory, plus an adapter directory on top when given."""
    model = load_model(checkpoint, device=device)
    if adapter is not None:
        if not (Path(adapter) / ADAPTER_CONFIG_NAME).is_file():
            raise LmforgeError(f"{adapter}: not an adapter directory (no {ADAPTER_CONFIG_NAME})")
        load_adapter(model, adapter)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
