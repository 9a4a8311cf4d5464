"""Adafactor (Shazeer & Stern, 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost").

Adam keeps two full-size moments per parameter; Adafactor keeps, for a matrix [n, m], only the row
and column means of the squared gradient (n + m numbers, Alg. 4): V_hat = R C / sum(R) is the
rank-1 approximation that minimizes the I-divergence to the full second moment. On top of that:
- beta2_t = 1 - t^c with decay rate c = -0.8 (§7.2): no bias correction is needed, since beta2_1 = 0;
- update clipping (§6): U / max(1, RMS(U) / d) with d = 1.0, which replaces Adam's warmup-critical
  beta2 trick against stale second moments;
- relative step size (§8): alpha_t = rho_t * max(eps2, RMS(X_{t-1})), the step is a fraction of the
  parameter's own scale (`scale_parameter`); with `relative_step`, rho_t = min(lr, 1/sqrt(t)),
  so lr = 1e-2 with a constant schedule is the T5 schedule (1e-2 for 10k steps, then 1/sqrt(t));
- optional first moment beta1 (off in T5, 0.9 in PaLM), taken over the clipped, scaled update.

Defaults are T5's: eps = (1e-30, 1e-3), d = 1.0, c = -0.8, beta1 off, scale_parameter and
relative_step on, lr 1e-2. PaLM (Chowdhery et al., 2022, §5) uses the same with beta1 = 0.9 and
no factorization of the first moment. Step semantics follow `transformers.optimization.Adafactor`
(decoupled weight decay multiplied by the step size); the tests compare against it step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


def _rms(x: Tensor) -> Tensor:
    """Root mean square, kept on the device: no host sync per parameter."""
    return x.norm(2) / math.sqrt(x.numel())


class Adafactor(torch.optim.Optimizer):
    """Factored second moments for tensors of dim >= 2 (over the last two dims), full ones otherwise.

    `lr` is rho_t when relative_step is off, and caps it (rho_t = min(lr, 1/sqrt(t))) when on; the
    trainer's schedule writes it each step. State per parameter: step (int), exp_avg_sq_row/col or
    exp_avg_sq, and exp_avg when beta1 > 0; all checkpointable by `lmforge.checkpoint.store`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, eps1: float = 1e-30, eps2: float = 1e-3,
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float = 0.0,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not decay_rate < 0:
            raise ValueError(f"decay_rate must be negative (beta2_t = 1 - t^decay_rate), got {decay_rate}")
        if not 0 <= beta1 < 1:
            raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
        if clip_threshold <= 0:
            raise ValueError(f"clip_threshold must be positive, got {clip_threshold}")
        defaults = {"lr": lr, "eps1": eps1, "eps2": eps2, "clip_threshold": clip_threshold,
                    "decay_rate": decay_rate, "beta1": beta1, "weight_decay": weight_decay,
                    "scale_parameter": scale_parameter, "relative_step": relative_step}
        super().__init__(params, defaults)

    @staticmethod
    def step_size(group: dict[str, Any], step: int, param_rms: Tensor) -> Tensor | float:
        """alpha_t = rho_t * max(eps2, RMS(X_{t-1})) (§8), rho_t = min(lr, 1/sqrt(t)) with relative_step."""
        rho = min(group["lr"], 1.0 / math.sqrt(step)) if group["relative_step"] else group["lr"]
        return param_rms.clamp(min=group["eps2"]) * rho if group["scale_parameter"] else rho

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        grad = p.grad.float()
        x = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p  # fp32 math for low-precision params
        state = self.state[p]
        factored = grad.dim() >= 2
        if not state:
            state["step"] = 0
            if factored:
                state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            if group["beta1"] > 0:
                state["exp_avg"] = torch.zeros_like(grad)
        state["step"] += 1
        t = state["step"]
        alpha = self.step_size(group, t, _rms(x))
        beta2t = 1.0 - t ** group["decay_rate"]
        sq = grad.square().add_(group["eps1"])
        if factored:  # Alg. 4: R_t, C_t are the row / column means of G^2 + eps1
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.lerp_(sq.mean(dim=-1), 1.0 - beta2t)
            col.lerp_(sq.mean(dim=-2), 1.0 - beta2t)
            # V_hat = R C / mean(R) (the paper's sum(R) over means instead of sums: same ratio)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = r_factor * col.unsqueeze(-2).rsqrt() * grad
        else:
            v = state["exp_avg_sq"]
            v.lerp_(sq, 1.0 - beta2t)
            update = v.rsqrt() * grad
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0)).mul_(alpha)  # §6 update clipping
        if group["beta1"] > 0:
            update = state["exp_avg"].lerp_(update, 1.0 - group["beta1"])
        if group["weight_decay"]:
            x.sub_(x * (group["weight_decay"] * alpha))
        x.sub_(update)
        if x is not p:
            p.copy_(x)
