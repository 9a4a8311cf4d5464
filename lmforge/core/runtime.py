"""Where and in what precision tensors run: one place that picks the device and the autocast context."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from lmforge.core.errors import LmforgeError

Precision = Literal["auto", "fp32", "bf16", "fp16"]


DEVICE_HELP = "auto, cpu, cuda, cuda:N or another device torch knows (mps, xpu, ...)"


def is_device_name(name: str) -> bool:
    """Whether torch can parse `name` as a device ('auto' included); says nothing about the hardware."""
    if name == "auto":
        return True
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def resolve_device(name: str = "auto", key: str = "device") -> torch.device:
    """'auto' prefers CUDA, then CPU; an unknown name, or 'cuda' on a machine without one, is a one-line
    user error naming the option `key`."""
    if not is_device_name(name):
        raise LmforgeError(f"{key} must be {DEVICE_HELP}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmforgeError(f"{key} {name!r} requested but CUDA is not available on this machine")
    return torch.device(name)


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """'auto' is bf16 where the hardware has fast bf16 (CUDA with bf16, or a CPU with AMX/AVX512-BF16)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def cpu_has_fast_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision keeps fp32 master weights; matmuls run in the low-precision dtype."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile where it can work; otherwise (no C++ compiler for inductor on CPU) the eager model.

    Compile errors fall back to eager execution instead of ending a run: speed is optional, the run is not.
    """
    import shutil
    import warnings

    if not torch.cuda.is_available() and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        warnings.warn("train.compile: no C++ compiler found for inductor; training eagerly", stacklevel=2)
        return model
    from torch import _dynamo

    _dynamo.config.suppress_errors = True
    return torch.compile(model)
