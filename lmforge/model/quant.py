"""Weight-only quantization: `quantize_weights(model, bits)` swaps linear layers for frozen int8 / int4 ones
(torchao's quantization; `pip install 'lmforge[quant]'`).

Batch-1 decoding reads every weight once per token, so its speed is bandwidth / bytes of weights; int8 reads a
quarter of fp32's bytes, int4 an eighth (plus one scale per row, or a scale and zero point per group of
`group_size` inputs). Activations stay in the model's dtype ("weight-only"): int8 keeps one scale per output row
(torchao's `Int8WeightOnlyConfig` tensor and kernel), int4 one scale and zero point per group of inputs
(`Int4Weight`: packed nibbles quantized with torchao's affine primitives).

How a quantized layer multiplies depends on how many input rows it gets (`DENSE_ROWS`): a few (decoding) go
through the quantized kernel (int8: torchao's weight-only matmul); many (training, prefill) multiply by the
dequantized weight with the dense kernel of the compute dtype, one layer's weight at a time, freed right after.
Dequantizing costs O(out * in) next to the O(rows * out * in) matmul, and the dense kernels are the fast ones.
int4 always dequantizes: torchao's CPU int4 kernel loops in scalar code for fp32 activations (one 4864 x 896
layer: 15 ms for one row, 10 s for 512 rows on an AVX2 CPU, vs 13 ms and 0.1 s dequantized).

`QuantLinear` is an `nn.Linear` whose weight is the quantized tensor, frozen: its forward is differentiable
with respect to its input (`quantized_linear`), so an adapter can train on top of it (QLoRA); the backward
multiplies by the weight dequantized again (nothing is kept between forward and backward). Embeddings are not
quantized by default (a token reads one row of them); the LM head is (it is the largest matrix a token reads),
unless `head=False`. A tied head is untied by quantizing it: the embedding keeps its full-precision copy.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import LmforgeError

Quantize = Literal["none", "int8", "int4"]
QUANTIZE_HELP = ("weight-only quantization of the linear layers (torchao, `pip install 'lmforge[quant]'`): "
                 "int8 or int4 weights, activations in the model's dtype; none keeps the weights as loaded")
INT4_GROUP_SIZES = (128, 64, 32)  # inputs per int4 scale; the largest dividing in_features is used
DENSE_ROWS = 32  # from this many input rows on, a quantized layer multiplies by its dequantized weight


def _torchao():
    """torchao's quantization API, or a one-line error naming the extra to install."""
    # torchao reports its optional CUDA extensions failing to load, and torch a deprecation in how torchao
    # registers an enum: expected noise on CPU, kept off the user's terminal
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            logging.getLogger("torchao").setLevel(logging.ERROR)
            pytree_log.setLevel(logging.ERROR)
            import torchao.quantization as tq
            import torchao.quantization.quant_primitives as primitives
    except ImportError as e:
        raise LmforgeError(f"weight quantization needs torchao ({e}): pip install 'lmforge[quant]'") from None
    finally:
        pytree_log.setLevel(level)
    return tq, primitives


@dataclass
class QuantReport:
    """What `quantize_weights` did: the layers it quantized and the ones it kept (with why)."""

    bits: int
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        kept = f"; kept {len(self.kept)} in full precision ({', '.join(sorted(set(self.kept.values())))})" \
            if self.kept else ""
        return f"int{self.bits} weights: {len(self.quantized)} linear layers quantized{kept}"


class Int4Weight(torch.Tensor):
    """A frozen int4 [out, in] weight whose dequantize is cheap: `qdata` [out, in / 2] uint8 holds input 2j in
    the low nibble and 2j + 1 in the high one; each group of `group_size` inputs of a row has an fp32 `scale` and
    a `zero_point` (uint8), both [out, in / group_size]. torchao's affine quantization (asymmetric, values 0..15):
    `dequantize` gives (q - zero_point) * scale, exactly what torchao's `dequantize_affine` gives.

    It behaves as a tensor of its full-precision shape and dtype where a module needs one (parameters, `.to`,
    `numel`); `F.linear` on it multiplies by the dequantized matrix; other operations are refused."""

    tensor_data_names = ("qdata", "scale", "zero_point")  # what `weight_bytes` counts

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int,
                dtype: torch.dtype) -> Int4Weight:
        return torch.Tensor._make_wrapper_subclass(cls, (qdata.shape[0], 2 * qdata.shape[1]), dtype=dtype,
                                                   device=qdata.device, requires_grad=False)

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int,
                 dtype: torch.dtype) -> None:
        self.qdata, self.scale, self.zero_point, self.group_size = qdata, scale, zero_point, group_size

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int) -> Int4Weight:
        """Per group of `group_size` inputs: torchao's `choose_qparams_affine` (asymmetric, 0..15), then
        `quantize_affine`; two values packed per byte."""
        _, primitives = _torchao()
        w = weight.detach().float()
        block, (qmin, qmax) = (1, group_size), (0, 15)
        scale, zero = primitives.choose_qparams_affine(w, primitives.MappingType.ASYMMETRIC, block, torch.uint8,
                                                       qmin, qmax)
        q = primitives.quantize_affine(w, block, scale, zero, torch.uint8, qmin, qmax)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        rows = w.shape[0]  # [out, groups], also with one group a row
        return cls(packed.contiguous(), scale.float().reshape(rows, -1), zero.to(torch.uint8).reshape(rows, -1),
                   group_size, weight.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [out, in] matrix in `dtype` (default: the weight's own), computed in fp32 as dequantize_affine."""
        rows, groups = self.scale.shape
        q = torch.stack((self.qdata & 15, self.qdata >> 4), dim=-1).view(rows, groups, self.group_size)
        w = q.float().sub_(self.zero_point.float()[..., None]).mul_(self.scale[..., None])
        return w.view(rows, -1).to(dtype or self.dtype)

    def _with(self, fn, dtype: torch.dtype | None = None) -> Int4Weight:
        return Int4Weight(fn(self.qdata), fn(self.scale), fn(self.zero_point), self.group_size, dtype or self.dtype)

    def __repr__(self) -> str:
        return (f"Int4Weight(shape={tuple(self.shape)}, group_size={self.group_size}, dtype={self.dtype}, "
                f"device={self.device})")

    def __tensor_flatten__(self):
        return list(self.tensor_data_names), (self.group_size, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Int4Weight(inner["qdata"], inner["scale"], inner["zero_point"], *meta)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, *rest = args
            return F.linear(x, dequantize(weight, compute_dtype(x)), *rest, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        weight = args[0]
        if func in (aten.detach.default, aten.alias.default):
            return weight._with(lambda t: t)
        if func is aten.clone.default:
            return weight._with(torch.clone)
        if func is aten._to_copy.default:  # .to(device) moves the data; .to(dtype) changes what it dequantizes to
            device = kwargs.get("device")
            return weight._with(lambda t: t.to(device) if device is not None else t, kwargs.get("dtype"))
        raise NotImplementedError(f"Int4Weight does not support {func}; dequantize() it first")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul with `x` runs in: autocast's where it is on for x's device, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _QuantMatmul(torch.autograd.Function):
    """y = x W^T + b with a frozen quantized W, differentiable in x: forward through the quantized kernel or, with
    `dense`, the dense one on W dequantized; backward dx = dy W with W dequantized again (nothing kept between)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dense: bool) -> torch.Tensor:
        ctx.weight = weight
        return _linear(x, weight, bias, dense)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ dequantize(ctx.weight, grad.dtype), None, None, None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dense: bool) -> torch.Tensor:
    if dense:  # the dequantized weight lives until this matmul returns
        return F.linear(x, dequantize(weight, compute_dtype(x)), bias)
    return F.linear(x, weight, bias)


def dequantize(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full-precision [out, in] matrix of a quantized weight (a plain tensor is returned in `dtype`)."""
    if type(weight) in (torch.Tensor, nn.Parameter):
        return weight.to(dtype)
    return weight.dequantize(dtype)  # an Int4Weight, or torchao's int8 tensor


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` with a frozen quantized weight, differentiable with respect to `x` (and only `x`). From
    `DENSE_ROWS` input rows on, x times the dequantized weight with the dense kernel; fewer, the quantized one."""
    dense = x.numel() >= DENSE_ROWS * x.shape[-1]
    if torch.is_grad_enabled() and x.requires_grad:
        return _QuantMatmul.apply(x, weight, bias, dense)
    return _linear(x, weight, bias, dense)


class QuantLinear(nn.Linear):
    """A frozen `nn.Linear` holding a weight-only quantized weight: torchao's int8 (per row) or an `Int4Weight`."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor, bits: int) -> None:
        nn.Module.__init__(self)  # no fresh full-precision weight: the quantized one replaces it
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}"


def _quantize_tensor(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The quantized tensor of a plain [out, in] weight: torchao's int8 one, or an `Int4Weight`."""
    if bits == 4:
        return Int4Weight.quantize(weight, group_size)
    tq, _ = _torchao()
    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    tq.quantize_(holder, tq.Int8WeightOnlyConfig())
    return holder.weight.data


def _int4_group(in_features: int, group_size: int) -> int | None:
    sizes = [g for g in INT4_GROUP_SIZES if g <= group_size and in_features % g == 0]
    return sizes[0] if sizes else None


def quantize_weights(model: nn.Module, bits: int, *, head: bool = True, group_size: int = 128,
                     skip: tuple[str, ...] = ()) -> QuantReport:
    """Replace `model`'s `nn.Linear` layers (in place) by frozen `QuantLinear`s with `bits` (8 or 4) weights.

    `head=False` keeps the LM head (`lm_head`) in full precision; `skip` names more layers to keep (a name
    matches a layer when it is the layer's qualified name or one of its dotted parts, e.g. "router").
    int4 groups `group_size` inputs per scale (the largest of 128/64/32 up to it that divides the layer's
    inputs; a layer no group divides is kept). Embeddings are never quantized. Returns what was done
    (`QuantReport`)."""
    if bits not in (8, 4):
        raise LmforgeError(f"quantize: bits must be 8 or 4, got {bits}")
    _torchao()
    report = QuantReport(bits)
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parts = name.split(".")
        if name in skip or any(p in skip for p in parts) or (not head and parts[-1] == "lm_head"):
            report.kept[name] = "skipped"
            continue
        group = _int4_group(linear.in_features, group_size) if bits == 4 else 0
        if group is None:
            report.kept[name] = f"int4 needs in_features a multiple of {INT4_GROUP_SIZES[-1]}"
            continue
        if linear.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            report.kept[name] = f"weight dtype {linear.weight.dtype}"
            continue
        quantized = QuantLinear(linear, _quantize_tensor(linear.weight, bits, group), bits)
        parent = model.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else model
        setattr(parent, parts[-1], quantized)
        report.quantized.append(name)
    return report


def weight_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor's storage takes; for a quantized tensor (torchao's, `Int4Weight`), its packed data plus scales."""
    names = getattr(tensor, "tensor_data_names", None)
    if names is None:
        return tensor.numel() * tensor.element_size()
    names = [*names, *getattr(tensor, "optional_tensor_data_names", [])]
    inner = [getattr(tensor, n, None) for n in names]
    return sum(weight_bytes(t) for t in inner if isinstance(t, torch.Tensor))


def bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights a batch-1 decode step reads: every linear layer's weight (and bias) whole, and one row
    of each embedding table. The roofline of decoding is memory bandwidth / this."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += weight_bytes(m.weight) + (weight_bytes(m.bias) if m.bias is not None else 0)
        elif isinstance(m, nn.Embedding):
            total += m.weight.shape[1] * m.weight.element_size()
    return total


def apply_quantize(model: nn.Module, mode: Quantize, *, adapter: bool = False) -> QuantReport | None:
    """What a command's `--quantize` does to the model it loaded: nothing for "none", else `quantize_weights`
    with its summary on stderr. `adapter`: the command also loaded an adapter, which is refused (merge it first:
    its layers would stay in full precision on top of quantized ones nobody validated)."""
    if mode == "none":
        return None
    if mode not in ("int8", "int4"):
        raise LmforgeError(f"quantize: expected none, int8 or int4, got {mode!r}")
    if adapter:
        raise LmforgeError("--quantize with an adapter: fold it in first (`lmforge merge-adapter`), then quantize "
                           "the merged model")
    report = quantize_weights(model, int(mode[3:]))
    print(f"lmforge: {report.summary()}", file=sys.stderr)
    return report
