"""LoRA (Hu et al., 2021): a frozen linear layer plus a trainable low-rank update, h = W x + s * B A x;
optionally DoRA (Liu et al., 2024), which rescales each output row of W + s B A to a trained magnitude.

lmforge fuses projections (`attn.qkv` = [q; k; v], `mlp.up` = [gate; up]) where HF LLaMA keeps them
apart, so one adapter here is a set of *parts*, each a (A, B) pair on a row range of one fused layer.
A LoRA on `q_proj` is then exactly PEFT's LoRA on `q_proj`, which is what makes the adapter files
interchangeable (`lmforge.peft.io`). Targets are named as in HF/PEFT; the HF -> lmforge mapping is the
`module_map` of the model's HF family adapter (`lmforge.model.hf.registry`), never repeated here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.config import option, require, suggest
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.model.hf.registry import module_map
from lmforge.model.quant import QuantLinear, dequantize, quantized_linear
from lmforge.model.transformer import Transformer

TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@dataclass
class LoraConfig:
    r: int = option(8, "rank of the update B A")
    alpha: float = option(16.0, "scale numerator: the update is multiplied by alpha / r")
    dropout: float = option(0.0, "dropout on the LoRA branch's input (not on the frozen layer's)")
    targets: list[str] = option(default_factory=lambda: ["q_proj", "v_proj"],
                                help=f"HF/PEFT module names to adapt: {', '.join(TARGET_NAMES)}")
    rslora: bool = option(False, "scale by alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023), stable at high rank")
    dora: bool = option(False, "DoRA (Liu et al. 2024): a trainable per-row magnitude times the LoRA-updated "
                               "direction W + sBA, normalized row by row")
    quantize: Literal["none", "int8", "int4"] = option(
        "none", "QLoRA: hold the frozen base's linear layers (all but lm_head) in int8 or int4 weights (torchao, "
                "`pip install 'lmforge[quant]'`) while the adapter (LoRA or DoRA) trains in full precision; the "
                "saved adapter applies to the full-precision base")

    def __post_init__(self) -> None:
        require(self.r > 0, "lora.r", self.r, "positive")
        require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "in [0, 1)")
        require(bool(self.targets), "lora.targets", self.targets, "a non-empty list of module names")
        for name in self.targets:
            if name not in TARGET_NAMES:
                hint = suggest(name, TARGET_NAMES)
                raise ConfigError(f"lora.targets: unknown module '{name}'"
                                  + (f" (did you mean '{hint}'?)" if hint else "")
                                  + f"; choose from {', '.join(TARGET_NAMES)}")

    @property
    def scaling(self) -> float:
        """alpha / r (Hu et al. 2021, sec. 4.1), or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023, eq. 2)."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraPart(nn.Module):
    """One low-rank pair on output rows [row_start, row_end) of a base layer: s * B(A(dropout(x))).

    With DoRA, `lora_magnitude` (m, one entry per row) starts at the row norms of the base rows, so
    the init is still the identity (Liu et al. 2024, eq. 2: W' = m (W + sBA) / ||W + sBA||_row).
    """

    def __init__(self, in_features: int, row_start: int, row_end: int, cfg: LoraConfig,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 base_rows: torch.Tensor | None = None) -> None:
        super().__init__()
        self.lora_magnitude: nn.Parameter | None = None
        self.merge_scale: torch.Tensor | None = None  # DoRA's m / ||W + sBA|| at merge time, for unmerge
        if cfg.dora:
            if base_rows is None:
                raise ValueError("DoRA needs the base rows to initialize its magnitude")
            self.lora_magnitude = nn.Parameter(base_rows.detach().float().norm(dim=1).to(base_rows.dtype))
        self.row_start, self.row_end, self.scaling = row_start, row_end, cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, cfg.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(cfg.r, row_end - row_start, bias=False, device=device, dtype=dtype)
        # PEFT's init: A like nn.Linear (Kaiming-uniform, a=sqrt(5)), B zero, so training starts at W.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # s scales the small B, not the [tokens, rows] output: the same product, one full-size pass less
        return F.linear(self.lora_A(self.dropout(x)), self.lora_B.weight * self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """s * B A, the [rows, in] change this part makes to the base weight (computed in fp32)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def dora_scale(self, rows: torch.Tensor) -> torch.Tensor:
        """m / ||W + sBA||_row. The norm is a constant for backprop (DoRA sec. 4.3: saves memory, same accuracy)."""
        with torch.no_grad():
            norm = (rows.float() + self.delta_weight()).norm(dim=1)
        return self.lora_magnitude / norm.to(self.lora_magnitude.dtype)

    def dora_delta(self, x: torch.Tensor, base_rows_out: torch.Tensor | None, rows: torch.Tensor,
                   base_linear=None) -> torch.Tensor:
        """What DoRA adds to the rows' output W x: (k - 1) W x + k s B A x with k = m / ||W + sBA||.

        Dropout, when active, is applied to x once for both terms (as PEFT does); `base_rows_out` = W x
        (no bias) is reused when dropout is off, else W xd is `base_linear(xd)` (default: xd times `rows`)."""
        xd = self.dropout(x)
        if base_rows_out is None or not isinstance(self.dropout, nn.Identity):
            base_rows_out = base_linear(xd) if base_linear is not None else F.linear(xd, rows)
        k = self.dora_scale(rows).to(x.dtype)
        return (k - 1) * base_rows_out + k * F.linear(self.lora_A(xd), self.lora_B.weight * self.scaling)


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus named adapters, one active; each adapter holds parts keyed by HF name.

    The base `weight`/`bias` stay under their own names, so the state-dict keys of the base model
    do not change when it is wrapped (and `merge_lora` hands back a plain nn.Linear).
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.quantized = isinstance(base, QuantLinear)  # QLoRA: a frozen int8/int4 weight under the adapter
        self.bits = base.bits if self.quantized else None
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # None stays None
        self.adapters = nn.ModuleDict()  # adapter name -> ModuleDict(part name -> LoraPart)
        self.active: str | None = None
        self.merged: str | None = None  # adapter whose update is folded into `weight`
        self.row_adapters: list[str | None] | None = None  # per batch row (serving); None: `active` for all

    def add_part(self, adapter_name: str, part_name: str, row_start: int, row_end: int,
                 cfg: LoraConfig) -> None:
        if not 0 <= row_start < row_end <= self.out_features:
            raise ValueError(f"rows [{row_start}, {row_end}) outside a layer with "
                             f"{self.out_features} outputs")
        parts = self.adapters[adapter_name] if adapter_name in self.adapters else nn.ModuleDict()
        rows = None
        if cfg.dora:  # DoRA's magnitude starts at the base rows' norms: the dequantized ones on a QLoRA base
            rows = self.full_weight(self.weight.dtype)[row_start:row_end]
        parts[part_name] = LoraPart(self.in_features, row_start, row_end, cfg, device=self.weight.device,
                                    dtype=self.weight.dtype, base_rows=rows)
        self.adapters[adapter_name] = parts

    def active_parts(self) -> list[LoraPart]:
        if self.active is None or self.active not in self.adapters:
            return []
        return list(self.adapters[self.active].values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (quantized_linear if self.quantized else F.linear)(x, self.weight, self.bias)
        if self.merged is not None:
            return y
        if self.row_adapters is not None:
            return self._per_row(x, y)
        return self._adapt(x, y, self.active_parts())

    def _per_row(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Batch row i takes adapter row_adapters[i]: one base matmul for the whole batch, then each adapter's
        low-rank update on its own rows (the segmented batching of S-LoRA, Sheng et al. 2023, and Punica)."""
        if len(self.row_adapters) != x.shape[0]:
            raise ValueError(f"{len(self.row_adapters)} row adapters for a batch of {x.shape[0]}")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.row_adapters):
            if name is not None and name in self.adapters:
                groups.setdefault(name, []).append(i)
        if not groups:
            return y
        out = y.clone()
        for name, rows in groups.items():
            idx = torch.tensor(rows, device=x.device)
            out[idx] = self._adapt(x[idx], y[idx], list(self.adapters[name].values()))
        return out

    def full_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as a plain [out, in] matrix: itself, or dequantized (a fresh copy) on a QLoRA base."""
        return dequantize(self.weight, dtype) if self.quantized else self.weight

    def _adapt(self, x: torch.Tensor, y: torch.Tensor, parts: list[LoraPart]) -> torch.Tensor:
        """y = W x + b plus what `parts` add."""
        plain = [part for part in parts if part.lora_magnitude is None]
        out = y + self.low_rank(x, plain) if plain else y
        dora = [part for part in parts if part.lora_magnitude is not None]
        # a quantized base is dequantized once for all DoRA parts: its rows enter the (constant) row norms only
        weight = self.full_weight(self.weight.dtype) if dora else None
        for part in dora:
            start, end = part.row_start, part.row_end
            base = y[..., start:end]
            if self.bias is not None:
                base = base - self.bias[start:end]
            base_linear = None
            if self.quantized:  # W xd under dropout through the quantized layer: no dequantized W kept for backward
                def base_linear(xd, start=start, end=end):
                    return quantized_linear(xd, self.weight)[..., start:end]
            delta = part.dora_delta(x, base, weight[start:end], base_linear)
            # Pad the part's rows out to the full width: out-of-place, so autograd sees a plain sum.
            out = out + F.pad(delta, (start, self.out_features - end))
        return out

    def low_rank(self, x: torch.Tensor, parts: list[LoraPart]) -> torch.Tensor:
        """Sum over parts of s B A x at full width, as two matmuls: x [A_1; ...; A_k]^T, then a block
        matrix whose column block i holds s_i B_i on part i's rows (zeros elsewhere). One pass over x and
        one full-width add instead of one per part (the parts of an adapter share their dropout config)."""
        if len(parts) == 1 and parts[0].row_end - parts[0].row_start == self.out_features:
            return parts[0](x)
        a = F.linear(parts[0].dropout(x), torch.cat([part.lora_A.weight for part in parts]))
        b = torch.cat([F.pad(part.lora_B.weight * part.scaling, (0, 0, part.row_start,
                                                                 self.out_features - part.row_end))
                       for part in parts], dim=1)
        return F.linear(a, b)

    def set_adapter(self, name: str | None) -> None:
        """Make `name` active (None: base layer only); a merged adapter is unmerged first."""
        if self.merged is not None and self.merged != name:
            self.unmerge()
        self.active = name

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into `weight` (W[rows] += s B A): inference then costs nothing extra. A
        quantized base is dequantized first, so the merged layer is full precision (with the base's rounding:
        for the exact merge, load the adapter on the full-precision base, as `lmforge merge-adapter` does)."""
        if self.merged is not None or not self.active_parts():
            return
        if self.quantized:
            dtype = self.active_parts()[0].lora_A.weight.dtype
            self.weight = nn.Parameter(dequantize(self.weight, dtype), requires_grad=False)
            self.quantized = False
        for part in self.active_parts():
            rows = self.weight[part.row_start:part.row_end]
            merged = rows.float() + part.delta_weight()
            if part.lora_magnitude is not None:  # W' = m (W + sBA) / ||W + sBA||
                part.merge_scale = part.dora_scale(rows).float()
                merged = merged * part.merge_scale[:, None]
            rows.copy_(merged.to(rows.dtype))
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter's update again (exact up to float rounding)."""
        if self.merged is None:
            return
        for part in self.adapters[self.merged].values():
            rows = self.weight[part.row_start:part.row_end]
            weight = rows.float()
            if part.merge_scale is not None:
                weight, part.merge_scale = weight / part.merge_scale[:, None], None
            rows.copy_((weight - part.delta_weight()).to(rows.dtype))
        self.merged = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, active={self.active}, merged={self.merged}"


@dataclass(frozen=True)
class LoraTarget:
    """Where one HF module lives in lmforge: `module` rows [row_start, row_end)."""

    hf_module: str  # e.g. "model.layers.0.self_attn.q_proj"
    module: str  # e.g. "blocks.0.attn.qkv"
    row_start: int
    row_end: int

    @property
    def part(self) -> str:
        return self.hf_module.rsplit(".", 1)[-1]


def lora_targets(model: Transformer, names: list[str] | tuple[str, ...] = TARGET_NAMES) -> list[LoraTarget]:
    """The adaptable HF modules of `model` whose short name is in `names`, read off `module_map`."""
    modules = dict(model.named_modules())
    targets = []
    for ours, theirs in module_map(model.cfg):
        module = modules.get(ours)
        if not isinstance(module, (nn.Linear, LoraLinear)):
            continue  # embeddings and norms
        start = 0
        for hf_name, rows in theirs:
            if hf_name.rsplit(".", 1)[-1] in names:
                targets.append(LoraTarget(hf_name, ours, start, start + rows))
            start += rows
        if start != module.out_features and any(t.module == ours for t in targets):
            raise LmforgeError(f"LoRA targets follow the LLaMA layout, which '{ours}' does not have "
                               f"({module.out_features} outputs, expected {start}; "
                               f"model.mlp={model.cfg.mlp!r})")
    return targets


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_names(model: nn.Module) -> set[str]:
    return {name for layer in lora_layers(model).values() for name in layer.adapters}


def apply_lora(model: Transformer, cfg: LoraConfig, adapter_name: str = "default") -> Transformer:
    """Freeze every parameter, then add adapter `adapter_name` (trainable and active) on `cfg.targets`.

    A second call with another name adds a second adapter beside the first; `set_adapter` switches.
    """
    if not adapter_name or "." in adapter_name:
        raise LmforgeError(f"adapter name must be non-empty without dots, got '{adapter_name}'")
    if adapter_name in adapter_names(model):
        raise LmforgeError(f"model already has a LoRA adapter named '{adapter_name}'")
    targets = lora_targets(model, cfg.targets)
    if not targets:
        present = sorted({t.part for t in lora_targets(model)})
        raise ConfigError(f"lora.targets {cfg.targets} match no layer of this model; it has {', '.join(present)}")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = lora_layers(model)
    for t in targets:
        if t.module not in layers:
            parent_name, _, child = t.module.rpartition(".")
            layers[t.module] = LoraLinear(getattr(model.get_submodule(parent_name), child))
            setattr(model.get_submodule(parent_name), child, layers[t.module])
        layers[t.module].add_part(adapter_name, t.part, t.row_start, t.row_end, cfg)
    for layer in layers.values():
        if adapter_name in layer.adapters:
            layer.adapters[adapter_name].requires_grad_(True)
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, adapter_name: str | None) -> None:
    """Activate `adapter_name` in every LoRA layer (None: the base model alone)."""
    if adapter_name is not None and adapter_name not in adapter_names(model):
        raise LmforgeError(f"no LoRA adapter named '{adapter_name}'; the model has "
                           f"{sorted(adapter_names(model)) or 'none'}")
    for layer in lora_layers(model).values():
        layer.set_adapter(adapter_name)


def set_row_adapters(model: nn.Module, names: list[str | None] | None) -> None:
    """The next forward passes apply adapter names[i] to batch row i (None: the base model); `names=None`
    goes back to the active adapter for every row. Unmerged adapters only."""
    for layer in lora_layers(model).values():
        if names is not None and layer.merged is not None:
            raise LmforgeError("per-row adapters need unmerged LoRA layers; this model has a merged adapter")
        layer.row_adapters = names


def delete_adapter(model: Transformer, adapter_name: str) -> Transformer:
    """Remove one adapter; layers left without adapters become plain nn.Linear again."""
    for name, layer in lora_layers(model).items():
        if adapter_name in layer.adapters:
            if layer.merged == adapter_name:
                layer.unmerge()
            del layer.adapters[adapter_name]
            if layer.active == adapter_name:
                layer.active = None
        if len(layer.adapters) == 0:
            _replace_with_linear(model, name, layer)
    return model


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors only, keyed `{module}.{part}.lora_A.weight` (no adapter name, so they
    load under any name)."""
    state = {}
    for name, layer in lora_layers(model).items():
        if adapter_name in layer.adapters:
            for part_name, part in layer.adapters[adapter_name].items():
                state[f"{name}.{part_name}.lora_A.weight"] = part.lora_A.weight.detach()
                state[f"{name}.{part_name}.lora_B.weight"] = part.lora_B.weight.detach()
                if part.lora_magnitude is not None:
                    state[f"{name}.{part_name}.lora_magnitude"] = part.lora_magnitude.detach()
    return state


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str = "default",
                         source: str = "adapter") -> None:
    """Copy `lora_state_dict`-style tensors into an applied adapter; any key or shape mismatch raises."""
    own = lora_state_dict(model, adapter_name)
    if not own:
        raise LmforgeError(f"{source}: the model has no LoRA adapter named '{adapter_name}'")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise LmforgeError(f"{source}: adapter tensors do not match its config: {what}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise LmforgeError(f"{source}: tensor '{key}' has shape {tuple(value.shape)}, the model expects "
                               f"{tuple(own[key].shape)}")
    for key, value in state.items():
        own[key].copy_(value)


def merge_lora(model: Transformer) -> Transformer:
    """Fold each layer's active adapter into its base weight and drop every LoRA wrapper: the result is a
    plain Transformer (its state dict is the base model's keys) that `save_model` writes as usual."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        _replace_with_linear(model, name, layer)
    return model


def _replace_with_linear(model: nn.Module, name: str, layer: LoraLinear) -> None:
    if layer.quantized:  # an unmerged QLoRA layer: its frozen quantized base again
        linear = QuantLinear(layer, layer.weight, layer.bits)
    else:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight, linear.bias = layer.weight, layer.bias
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, linear)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
