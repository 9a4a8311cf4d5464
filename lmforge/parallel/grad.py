"""Global gradient-norm clipping that also works when parameters are sharded DTensors (FSDP2, tensor parallel).

torch's `clip_grad_norm_` needs every gradient on one mesh; with TP the embedding stays a plain replicated
tensor while attention weights are DTensors, and under FSDP x TP they live on different meshes. Here each
group (plain, or one mesh) gets its norm reduced to a plain number first, and the groups combine as
sqrt(sum of squares) — the same norm a single process computes. Under pipeline parallelism each process holds
other parameters: the squares are also summed over the pipeline's process group, so every stage clips by the
global norm.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable

import torch
import torch.distributed as dist


def is_dtensor(t: object) -> bool:
    """Without importing torch.distributed.tensor (1-2 s): if nobody imported it, nothing is a DTensor."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _group_norm(grads: list[torch.Tensor]) -> float:
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if is_dtensor(norm):
        norm = norm.full_tensor()
    return float(norm)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, group: object = None) -> float:
    """Scale all gradients so their global L2 norm is at most `max_norm`; returns the norm before clipping.
    `group`: the process group whose processes hold the other parameters (pipeline stages), or None."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if group is None and not any(is_dtensor(g) for g in grads):  # the single-process path, exactly torch's
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item() if params else 0.0
    groups: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device_mesh if is_dtensor(g) else None, []).append(g)
    squares = sum(_group_norm(gs) ** 2 for gs in groups.values())
    if group is not None:
        device = grads[0].device if grads else torch.device("cpu")
        t = torch.tensor([squares], dtype=torch.float64, device=device)
        dist.all_reduce(t, group=group)
        squares = t.item()
    total = math.sqrt(squares)
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        with torch.no_grad():
            for g in grads:
                g.mul_(coef)
    return total

