"""The HF families lmforge converts, keyed by HF `model_type`: the one list of them.

Its order is the order `--family auto` asks `claims` in, so each family is the fallback of those before it
(LLaMA, last, takes every decoder left). The functions below are the library API over any family.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.hf.base import HFAdapter, ModuleMap
from lmforge.model.hf.deepseek import DeepSeekV3Adapter
from lmforge.model.hf.gpt2 import GPT2Adapter
from lmforge.model.hf.io import TOKEN_ID_KEYS, check_dtype
from lmforge.model.hf.llama import LlamaAdapter, MistralAdapter, Qwen2Adapter
from lmforge.model.hf.t5 import T5Adapter

ADAPTERS: dict[str, HFAdapter] = {a.model_type: a for a in (
    DeepSeekV3Adapter(), T5Adapter(), GPT2Adapter(), MistralAdapter(), Qwen2Adapter(), LlamaAdapter())}


def adapter_for(model_type: str | None, source: str = "HF config") -> HFAdapter:
    """The adapter of an HF `model_type`; an unknown one raises naming the supported ones."""
    if model_type not in ADAPTERS:
        raise LmforgeError(f"{source}: model_type '{model_type}' is not supported; supported: {', '.join(ADAPTERS)}")
    return ADAPTERS[model_type]


def export_adapter(cfg: ModelConfig, recorded: str | None = None) -> HFAdapter:
    """The family `cfg` exports as with `--family auto` (`recorded`: the family it was imported from)."""
    return next(a for a in ADAPTERS.values() if a.claims(cfg, recorded))


def _adapter(cfg: ModelConfig, family: str | None) -> HFAdapter:
    return adapter_for(family, "family") if family else export_adapter(cfg)


def model_config_from_hf(hf: dict[str, Any], source: str = "HF config") -> ModelConfig:
    """ModelConfig for a `config.json` dict of any registered family."""
    return adapter_for(hf.get("model_type"), source).config_from_hf(hf, source)


def hf_config_from_model(cfg: ModelConfig, torch_dtype: str = "float32", token_ids: dict[str, Any] | None = None,
                         family: str | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `config.json` dict for `family` (default: the one `--family auto` picks); read by transformers 4.x and
    5.x alike (both spellings of the dtype and RoPE keys). `token_ids` sets bos/eos/pad ids; unknown ones are
    written as null so HF does not assume LLaMA's 1/2, unless the family keeps its own defaults (T5: pad 0)."""
    adapter = _adapter(cfg, family)
    adapter.check(cfg)
    check_dtype(torch_dtype)
    ids = {k: (token_ids or {}).get(k) for k in TOKEN_ID_KEYS}
    if not adapter.null_token_ids:
        ids = {k: v for k, v in ids.items() if v is not None}
    return {**adapter.config_to_hf(cfg, meta or {}), **ids, "dtype": torch_dtype, "torch_dtype": torch_dtype}


def module_map(cfg: ModelConfig, family: str | None = None) -> ModuleMap:
    """(lmforge module, [(HF module, rows), ...]) of `family` (default: the one `--family auto` picks)."""
    return _adapter(cfg, family).module_map(cfg)


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, family: str | None = None,
                       meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """lmforge tensors from HF tensors of `family`; a missing, extra or mis-shaped tensor raises."""
    return _adapter(cfg, family).state_dict_from_hf(hf_state, cfg, meta or {})


def state_dict_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, family: str | None = None,
                     meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """HF tensors of `family` from lmforge ones (views into `state`; clone before saving)."""
    return _adapter(cfg, family).state_dict_to_hf(state, cfg, meta or {})
