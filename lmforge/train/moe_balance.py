"""Auxiliary-loss-free load balancing (DeepSeek-V3 section 2.1.2, Wang et al. 2024) and expert-utilization
metrics, as a `train_loop` on_step_end hook.

Each router keeps a per-expert bias that only shifts which experts are chosen (gate weights still come from
the raw affinities). After every optimizer step the bias of each overloaded expert drops by gamma and that
of each underloaded expert rises by gamma, so balance needs no gradient that fights the LM loss.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.moe import MoE


def update_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """b_i + gamma * sign(mean load - load_i): raise underloaded experts, lower overloaded ones."""
    return bias + rate * torch.sign(load.float().mean() - load.float())


def load_stats(load: torch.Tensor) -> dict[str, float]:
    """max/min and max/mean of per-expert token counts (1.0 each when perfectly balanced)."""
    load = load.float()
    return {"max_min": float(load.max() / load.min().clamp(min=1.0)), "max_mean": float(load.max() / load.mean())}


class MoEBalancer:
    """hook(model, step) -> expert-utilization metrics averaged over MoE layers: `moe_load_max_min`,
    `moe_load_max_mean` for the tokens routed since the previous step, plus the last forward's unweighted
    balance/z losses and dropped-token fraction where enabled. With `rate` > 0 it also applies `update_bias`
    to every router (after an all-reduce of the loads under torch.distributed, so ranks stay identical)."""

    def __init__(self, rate: float = 0.0) -> None:
        self.rate = rate

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def add(key: str, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1

        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            router = moe.router
            if distributed:
                torch.distributed.all_reduce(router.load)
            for key, value in moe.metrics.items():
                add(key, float(value))
            moe.metrics = {}
            if router.load.sum() == 0:
                continue
            for key, value in load_stats(router.load).items():
                add(f"moe_load_{key}", value)
            if self.rate:
                router.bias.copy_(update_bias(router.bias, router.load, self.rate))
            router.load.zero_()
        return {k: v / counts[k] for k, v in sums.items()}
