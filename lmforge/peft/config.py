"""The `peft` section every fine-tuning recipe shares (`lmforge sft`, `dpo`, `grpo`, ...).

One entry point per direction keeps the trainers ignorant of which method is in use:
`apply_peft` before training (freezes the base, adds the trainable modules), `save_trained`
after it (adapter files for a PEFT method, a full model directory otherwise), `load_trained` to
get the result back for generation or the next stage. Every method leaves `model(input_ids, ...)`,
its output shapes, `return_hidden`, `model.lm_head` and KV-cache generation as they were.

| method     | trains                                     | files (adapter_config.json peft_type) |
|------------|--------------------------------------------|---------------------------------------|
| lora       | low-rank B A (+ DoRA magnitude) on targets | LORA (PEFT)                           |
| adapter    | bottleneck MLPs after attention / MLP      | LMFORGE_BOTTLENECK (lmforge only)     |
| prefix     | per-layer K/V prefixes through an MLP      | PREFIX_TUNING (PEFT, MLP folded)      |
| ptuning_v2 | per-layer K/V prefixes directly            | PREFIX_TUNING (PEFT)                  |
| prompt     | soft-prompt input embeddings               | PROMPT_TUNING (PEFT)                  |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from lmforge.core.config import option
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.model.io import load_model, save_model
from lmforge.model.quant import quantize_weights
from lmforge.model.transformer import Transformer
from lmforge.peft.adapter import PEFT_TYPE as BOTTLENECK_TYPE
from lmforge.peft.adapter import AdapterConfig, apply_adapters, load_adapters, save_adapters
from lmforge.peft.io import load_adapter, read_adapter_config, save_adapter
from lmforge.peft.lora import LoraConfig, apply_lora, count_parameters, lora_layers, merge_lora
from lmforge.peft.prefix import PrefixConfig, apply_prefix_tuning, load_prefix, save_prefix
from lmforge.peft.prompt import PromptConfig, apply_prompt_tuning, load_prompt, save_prompt

PeftMethod = Literal["none", "lora", "adapter", "prefix", "ptuning_v2", "prompt"]


@dataclass
class PeftConfig:
    method: PeftMethod = option("none", "parameter-efficient method; none trains every weight")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA / DoRA (method = lora)"})
    adapter: AdapterConfig = field(default_factory=AdapterConfig,
                                   metadata={"help": "bottleneck adapters (method = adapter)"})
    prefix: PrefixConfig = field(default_factory=PrefixConfig,
                                 metadata={"help": "prefix tuning / P-tuning v2 (method = prefix, ptuning_v2)"})
    prompt: PromptConfig = field(default_factory=PromptConfig, metadata={"help": "prompt tuning (method = prompt)"})


def apply_peft(model: Transformer, cfg: PeftConfig) -> Transformer:
    """Prepare `model` for training under `cfg`, in place, and print trainable vs total parameters."""
    if cfg.method != "lora" and cfg.lora.quantize != "none":
        raise ConfigError(f"peft.lora.quantize={cfg.lora.quantize} needs peft.method lora (QLoRA), got "
                          f"{cfg.method}")
    if cfg.method == "lora":
        if "lm_head" in cfg.lora.targets:
            raise ConfigError("peft.lora.targets: lm_head cannot be trained here (the fused LM loss reads "
                              "lm_head.weight directly, so its LoRA would get no gradient); drop it")
        if cfg.lora.quantize != "none":
            for p in model.parameters():
                p.requires_grad_(False)
            report = quantize_weights(model, int(cfg.lora.quantize[3:]), head=False)
            print(f"peft: QLoRA base, {report.summary()}")
        apply_lora(model, cfg.lora)
    elif cfg.method == "adapter":
        apply_adapters(model, cfg.adapter)
    elif cfg.method in ("prefix", "ptuning_v2"):
        apply_prefix_tuning(model, cfg.prefix, projection=cfg.method == "prefix" and cfg.prefix.projection)
    elif cfg.method == "prompt":
        apply_prompt_tuning(model, cfg.prompt)
    trainable, total = count_parameters(model)
    print(f"peft: method {cfg.method}, {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / max(total, 1):.2f}%)")
    return model


def save_trained(model: Transformer, cfg: PeftConfig, directory: str | Path) -> Path:
    """Write what training produced: PEFT adapter files for a PEFT method, else a full model directory."""
    if cfg.method == "lora":
        return save_adapter(model, directory, cfg.lora)
    if cfg.method == "adapter":
        return save_adapters(model, directory, cfg.adapter)
    if cfg.method in ("prefix", "ptuning_v2"):
        return save_prefix(model, directory)
    if cfg.method == "prompt":
        return save_prompt(model, directory)
    return save_model(model, directory)


def load_any_adapter(model: Transformer, directory: str | Path) -> str:
    """Add whichever adapter `directory` holds (LoRA/DoRA, bottleneck, prefix, prompt); returns its peft_type."""
    data, source = read_adapter_config(directory)
    kind = data.get("peft_type")
    loaders = {"LORA": load_adapter, BOTTLENECK_TYPE: load_adapters, "PREFIX_TUNING": load_prefix,
               "PROMPT_TUNING": load_prompt}
    if kind not in loaders:
        raise LmforgeError(f"{source}: peft_type {kind!r} is not supported (one of {', '.join(loaders)})")
    loaders[kind](model, directory)
    return kind


def load_trained(checkpoint: str | Path, adapter: str | Path | None = None,
                 device: str = "cpu") -> Transformer:
    """A model directory, plus an adapter directory on top when given."""
    model = load_model(checkpoint, device=device)
    if adapter is not None:
        load_any_adapter(model, adapter)
    return model


def merge_adapter(model: Transformer) -> Transformer:
    """Fold a loaded LoRA/DoRA adapter into the base weights; other methods cannot be merged (one line)."""
    if model.virtual_tokens is not None:
        raise LmforgeError("prompt and prefix tuning cannot be merged into the weights (they add positions, not "
                           "weight changes); use `lmforge generate --adapter` instead")
    if any(hasattr(m, "adapter") for m in model.modules()):
        raise LmforgeError("bottleneck adapters cannot be merged into the weights (a nonlinear residual MLP); "
                           "use `lmforge generate --adapter` instead")
    if not lora_layers(model):
        raise LmforgeError("the model has no LoRA adapter to merge")
    return merge_lora(model)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
