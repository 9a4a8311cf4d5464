"""Bottleneck adapters (Houlsby et al., 2019): a small residual MLP after attention and/or the MLP of each block.

h <- h + up(act(down(h))), with `down` d -> size and `up` size -> d. `up` starts at zero, so at init the
adapter is the identity and the adapted model computes exactly what the base computes (sec. 2.1 of the
paper asks for near-identity init). The adapter sits on the sublayer's output before the residual add,
as in the paper's Figure 2; it is attached with a forward hook, so the base model's modules, forward
signatures and state-dict keys are untouched and the adapter's tensors live under `<sublayer>.adapter.*`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.config import from_dict, option, require, to_dict
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.model.io import load_weights
from lmforge.model.transformer import Transformer
from lmforge.peft.io import ADAPTER_WEIGHTS_NAME, read_adapter_config, write_adapter_dir

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


@dataclass
class AdapterConfig:
    size: int = option(64, "bottleneck width (the paper's m); the adapter adds about 2 * d_model * size per site")
    where: Literal["both", "attn", "mlp"] = option("both", "after attention, after the MLP, or after both")
    activation: Literal["gelu", "relu", "silu", "tanh"] = option("gelu", "nonlinearity between down and up")

    def __post_init__(self) -> None:
        require(self.size > 0, "adapter.size", self.size, "positive")


class Bottleneck(nn.Module):
    """x + up(act(down(x))); `up` is zero-initialized, so the module starts as the identity."""

    def __init__(self, d_model: int, size: int, activation: str, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.activation = activation
        self.down = nn.Linear(d_model, size, device=device, dtype=dtype)
        self.up = nn.Linear(size, d_model, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(ACTIVATIONS[self.activation](self.down(x)))


def _run_adapter(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return module.adapter(output)


def adapter_sites(model: Transformer, where: str) -> list[nn.Module]:
    kinds = {"both": ("attn", "mlp"), "attn": ("attn",), "mlp": ("mlp",)}[where]
    return [getattr(block, kind) for block in model.blocks for kind in kinds]


def apply_adapters(model: Transformer, cfg: AdapterConfig) -> Transformer:
    """Freeze the base and add a trainable bottleneck after each chosen sublayer of every block."""
    if any(hasattr(m, "adapter") for m in model.modules()):
        raise LmforgeError("the model already has bottleneck adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    ref = model.embed.weight
    for site in adapter_sites(model, cfg.where):
        site.adapter = Bottleneck(model.cfg.d_model, cfg.size, cfg.activation, device=ref.device, dtype=ref.dtype)
        site.register_forward_hook(_run_adapter)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor, keyed by its name in `model` (e.g. `blocks.0.attn.adapter.down.weight`)."""
    return {k: v.detach() for k, v in model.state_dict().items() if ".adapter." in k}


# ----------------------------------------------------------------------------------------------
# files: PEFT's directory layout under an lmforge peft_type (PEFT itself has no bottleneck adapters)

PEFT_TYPE = "LMFORGE_BOTTLENECK"


def save_adapters(model: Transformer, directory: str | Path, cfg: AdapterConfig) -> Path:
    state = adapter_state_dict(model)
    if not state:
        raise LmforgeError("the model has no bottleneck adapters to save")
    config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", **to_dict(cfg)}
    return write_adapter_dir(directory, state, config)


def load_adapters(model: Transformer, directory: str | Path) -> AdapterConfig:
    """Add the bottleneck adapters saved in `directory`; on a mismatch the model is left as it was."""
    data, source = read_adapter_config(directory)
    values = {k: v for k, v in data.items() if k not in ("peft_type", "task_type")}
    try:
        cfg = from_dict(AdapterConfig, values, "adapter.")
    except ConfigError as e:
        raise LmforgeError(f"{source}: {e}") from None
    weights = Path(directory) / ADAPTER_WEIGHTS_NAME
    state = load_weights(weights)
    with torch.device("meta"):
        expected = adapter_state_dict(apply_adapters(Transformer(model.cfg), cfg))
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        diff = sorted(set(state) ^ set(expected)) or [k for k in state if state[k].shape != expected[k].shape]
        raise LmforgeError(f"{weights}: adapter tensors do not match this model and {source.name}: {diff[:3]}")
    apply_adapters(model, cfg)
    with torch.no_grad():
        own = adapter_state_dict(model)
        for key, value in state.items():
            own[key].copy_(value)
    return cfg
