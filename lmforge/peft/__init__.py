"""Parameter-efficient fine-tuning: LoRA layers (`lora`) and HF PEFT-compatible adapter files (`io`)."""

from lmforge.peft.io import load_adapter, save_adapter
from lmforge.peft.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    count_parameters,
    delete_adapter,
    lora_state_dict,
    merge_lora,
    set_adapter,
)

__all__ = ["LoraConfig", "LoraLinear", "apply_lora", "count_parameters", "delete_adapter", "load_adapter",
           "lora_state_dict", "merge_lora", "save_adapter", "set_adapter"]
