"""Parameter-efficient fine-tuning: LoRA/DoRA (`lora`), bottleneck adapters (`adapter`), prefix tuning and
P-tuning v2 (`prefix`), prompt tuning (`prompt`), adapter files (`io`), and the recipe section (`config`)."""

from lmforge.peft.adapter import AdapterConfig, apply_adapters
from lmforge.peft.config import PeftConfig, apply_peft, load_any_adapter, load_trained, merge_adapter, save_trained
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
from lmforge.peft.prefix import PrefixConfig, apply_prefix_tuning
from lmforge.peft.prompt import PromptConfig, apply_prompt_tuning

__all__ = ["AdapterConfig", "LoraConfig", "LoraLinear", "PeftConfig", "PrefixConfig", "PromptConfig",
           "apply_adapters", "apply_lora", "apply_peft", "apply_prefix_tuning", "apply_prompt_tuning",
           "count_parameters", "delete_adapter", "load_adapter", "load_any_adapter", "load_trained",
           "lora_state_dict", "merge_adapter", "merge_lora", "save_adapter", "save_trained", "set_adapter"]
