"""The HF adapter protocol: what one family (one HF `model_type`) tells the converter.

An adapter reads and writes the family's `config.json` (`config_from_hf` / `config_to_hf`), says which
lmforge configs it can express (`check`) and which ones `--family auto` exports as it (`claims`), and maps
tensors both ways. `StackedAdapter` does the tensor mapping for families whose every lmforge tensor is HF
tensors stacked along dim 0 (`module_map`), so such a family writes only names and row counts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.encdec import build_model

# (lmforge module, [(HF module, rows), ...]): the HF tensors stacked along dim 0 make the lmforge one.
ModuleMap = list[tuple[str, list[tuple[str, int]]]]


def config_from_values(values: dict[str, Any], source: str) -> ModelConfig:
    """ModelConfig from the values a family read off `config.json`; an invalid one names the file."""
    try:
        return from_dict(ModelConfig, values, "model.")
    except ConfigError as e:
        raise LmforgeError(f"{source}: {e}") from None


def require(cfg: ModelConfig, wanted: dict[str, Any], architecture: str) -> None:
    """Raise naming the first ModelConfig field whose value `architecture` cannot express."""
    for field, value in wanted.items():
        if getattr(cfg, field) != value:
            raise LmforgeError(f"model.{field}={getattr(cfg, field)!r} cannot be exported as {architecture} "
                               f"(it needs {field}={value!r})")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an lmforge model directory holds for `cfg`, read off a meta-device model (no memory)."""
    with torch.device("meta"):
        model = build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def unexplained(keys: list[str]) -> LmforgeError:
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return LmforgeError(f"HF weights have tensors the config does not explain: {keys[:3]}{more}")


class HFAdapter(ABC):
    """One HF family. `meta` below is the HF config.json on import and the `hf` section `from_hf` recorded
    in the lmforge config on export (empty when neither is known)."""

    model_type: str  # HF `model_type`, the registry key
    architecture: str  # HF model class `config.json` names
    null_token_ids = True  # write unknown bos/eos/pad ids as null; False keeps the HF class's own defaults
    fp32_suffixes: tuple[str, ...] = ()  # HF tensors kept in fp32 whatever the export dtype

    @abstractmethod
    def claims(self, cfg: ModelConfig, recorded: str | None) -> bool:
        """Whether `--family auto` exports `cfg` (imported from HF `recorded`, if any) as this family;
        asked in registry order, so a later family is the fallback of an earlier one."""

    @abstractmethod
    def config_from_hf(self, hf: dict[str, Any], source: str) -> ModelConfig:
        """ModelConfig for a `config.json` dict; what lmforge would compute differently raises."""

    def fit_weights(self, cfg: ModelConfig, hf_state: dict[str, torch.Tensor]) -> ModelConfig:
        """`cfg` amended by what only the weights tell (e.g. an untied head, MTP modules)."""
        return cfg

    def record(self, hf: dict[str, Any]) -> dict[str, Any]:
        """Keys of the HF config to keep in the lmforge config so that export writes them back."""
        return {}

    @abstractmethod
    def check(self, cfg: ModelConfig) -> None:
        """Raise naming the first ModelConfig value the HF class cannot express."""

    @abstractmethod
    def config_to_hf(self, cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
        """The family's `config.json` keys for `cfg` (token ids and dtype are added by the caller)."""

    @abstractmethod
    def module_map(self, cfg: ModelConfig) -> ModuleMap:
        """HF module names of lmforge's linear layers (and of the tensors `StackedAdapter` maps); LoRA names
        its targets and PEFT keys from this map."""

    @abstractmethod
    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], cfg: ModelConfig,
                           meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        """lmforge tensors from HF ones; a missing, extra or mis-shaped tensor raises."""

    @abstractmethod
    def state_dict_to_hf(self, state: dict[str, torch.Tensor], cfg: ModelConfig,
                         meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        """HF tensors from lmforge ones (views into `state`; clone before saving)."""


class StackedAdapter(HFAdapter):
    """Tensor mapping driven by `module_map`: each lmforge weight/bias is its HF parts concatenated along
    dim 0. A bias one side has and the other lacks is zero on the lacking side, which changes no output."""

    def transposed(self, hf_name: str) -> bool:
        """Whether HF stores this module's weight as [in, out] (GPT-2's Conv1D)."""
        return False

    def normalize_state(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF tensors as `module_map` names them (prefixes fixed, copies and buffers dropped)."""
        return hf_state

    def zero_biases(self, cfg: ModelConfig) -> dict[str, bool]:
        """HF module groups (`self_attn`, `mlp`) whose every linear layer must carry a bias on export."""
        return {}

    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], cfg: ModelConfig,
                           meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        hf_state = self.normalize_state(hf_state)
        shapes = expected_shapes(cfg)
        state, used = {}, set()
        for ours, theirs in self.module_map(cfg):
            for suffix in ("weight", "bias"):
                key = f"{ours}.{suffix}"
                if key in shapes:
                    state[key] = self._stack(hf_state, theirs, suffix, used, key, shapes[key])
        ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()  # some tied checkpoints store the copy
        unexpected = sorted(k for k in hf_state if k not in used and k not in ignorable
                            and not k.endswith("rotary_emb.inv_freq")
                            and not (k.endswith(".bias") and not hf_state[k].any()))  # a zero bias is no bias
        if unexpected:
            raise unexplained(unexpected)
        return state

    def _stack(self, hf_state: dict[str, torch.Tensor], theirs: list[tuple[str, int]], suffix: str,
               used: set[str], key: str, shape: tuple[int, ...]) -> torch.Tensor:
        parts = []
        for name, rows in theirs:
            hf_key = f"{name}.{suffix}"
            if hf_key in hf_state:
                flip = suffix == "weight" and self.transposed(name)
                parts.append(hf_state[hf_key].t() if flip else hf_state[hf_key])
                used.add(hf_key)
            elif suffix == "bias":  # a bias HF does not have is zero
                parts.append(torch.zeros(rows, dtype=hf_state[f"{name}.weight"].dtype))
            else:
                raise LmforgeError(f"HF weights have no tensor '{hf_key}' (the config expects it)")
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(tensor.shape) != shape:
            detail = ", ".join(f"{n}.{suffix} {tuple(p.shape)}" for (n, _), p in zip(theirs, parts))
            raise LmforgeError(f"HF tensor shapes do not match the config: {detail}; expected {key} "
                               f"{shape} in total")
        return tensor

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], cfg: ModelConfig,
                         meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.check(cfg)
        shapes = expected_shapes(cfg)
        for key, shape in shapes.items():
            if key not in state:
                raise LmforgeError(f"checkpoint has no tensor '{key}' (the config expects it)")
            if tuple(state[key].shape) != shape:
                raise LmforgeError(f"checkpoint tensor '{key}' has shape {tuple(state[key].shape)}, the config "
                                   f"expects {shape}")
        unexpected = sorted(set(state) - set(shapes) - {"lm_head.weight"})
        if unexpected:
            raise LmforgeError(f"checkpoint has tensors the config does not explain: {unexpected[:3]}")
        hf_bias = self.zero_biases(cfg)
        hf_state = {}
        for ours, theirs in self.module_map(cfg):
            split = [rows for _, rows in theirs]
            weights = state[f"{ours}.weight"].split(split, dim=0)
            bias = state.get(f"{ours}.bias")
            biases = bias.split(split, dim=0) if bias is not None else [None] * len(theirs)
            for (name, rows), w, b in zip(theirs, weights, biases):
                hf_state[f"{name}.weight"] = w.t() if self.transposed(name) else w
                wants_bias = any(f".{group}." in name and on for group, on in hf_bias.items())
                if b is not None or wants_bias:
                    hf_state[f"{name}.bias"] = b if b is not None else torch.zeros(rows, dtype=w.dtype)
        return hf_state
