"""Policy-gradient math for PPO and GRPO as pure functions of per-token tensors.

Every tensor is [N, T] over response tokens, with a float `mask` (1 = a generated token, 0 = prompt or
padding); nothing here touches a model, so each function is checked on hand-computed numbers.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` where mask is 1 (over everything, or along `dim`); an empty row gives 0."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath sec. 4.1.2): A_i = (r_i - mean(r)) / (std(r) + eps)
    within each group of `group_size` consecutive samples of one prompt. std is the unbiased one, as TRL's
    GRPOTrainer computes it. A group whose samples all score the same gets advantage 0 (no signal)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if group_size < 2:
        raise ValueError("group-relative advantages need group_size >= 2")
    groups = rewards.float().view(-1, group_size)
    adv = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)
    return adv.view(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, eq. 6): A_i = r_i - 1/(k-1) sum_{j != i} r_j
    within each group of k = `group_size` samples of one prompt: each sample's baseline is the mean reward of its
    siblings, so the baseline is unbiased (it does not depend on the sample it judges) and needs no value network.
    Equal to k/(k-1) (r_i - mean(r)). As TRL's RLOOTrainer computes it (before its optional normalization)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if group_size < 2:
        raise ValueError("leave-one-out advantages need group_size >= 2")
    groups = rewards.float().view(-1, group_size)
    baselines = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baselines).view(-1)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman 2020, "Approximating
    KL divergence"; DeepSeekMath eq. 4): unbiased and always >= 0."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1.0


def clipped_surrogate(logps: Tensor, old_logps: Tensor, advantages: Tensor, clip_eps: float
                      ) -> tuple[Tensor, Tensor]:
    """PPO's clipped objective per token (Schulman et al. 2017, eq. 7), as a LOSS to minimize:
    -min(rho A, clip(rho, 1-eps, 1+eps) A) with rho = pi/pi_old. `advantages` is [N, T] or [N] (one per
    sequence, broadcast over its tokens). Returns (per-token loss, per-token 1.0 where clipping was active)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def grpo_loss(logps: Tensor, old_logps: Tensor, ref_logps: Tensor | None, advantages: Tensor, mask: Tensor,
              clip_eps: float = 0.2, kl_coef: float = 0.0,
              norm: Literal["sequence", "token"] = "sequence") -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO objective (DeepSeekMath eq. 3), negated: per token -[min(rho A, clip(rho) A) - beta KL_k3].
    "sequence" averages over each completion's tokens, then over completions (the paper's 1/G sum 1/|o_i|);
    "token" averages over all tokens of the batch (DAPO, Yu et al. 2025), so long completions weigh more.
    Returns (scalar loss, {"kl", "clip_frac"} detached)."""
    per_token, clipped = clipped_surrogate(logps, old_logps, advantages, clip_eps)
    kl = k3_kl(logps, ref_logps) if ref_logps is not None else torch.zeros_like(logps)
    if kl_coef:
        per_token = per_token + kl_coef * kl
    if norm == "sequence":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif norm == "token":
        loss = masked_mean(per_token, mask)
    else:
        raise ValueError(f"norm must be 'sequence' or 'token', got {norm!r}")
    return loss, {"kl": masked_mean(kl, mask).detach(), "clip_frac": masked_mean(clipped, mask).detach()}


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) along each row's masked tokens:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V = 0 after the last token.
    Masked positions must come after a row's last real token (right padding). Returns (advantages,
    returns = A + V), both zero where mask is 0."""
    N, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(N, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, a, next_adv)
    return adv, (adv + values) * mask


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries: PPO's per-batch advantage normalization. The variance is the
    unbiased one, sum (x - mean)^2 / (n - 1), as TRL's `masked_whiten` (via `masked_var(unbiased=True)`)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_eps: float = 0.2) -> tuple[Tensor, Tensor]:
    """PPO2's value loss: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2), averaged over tokens
    (the clipping keeps the critic near the one that produced the advantages). Returns (loss, clip fraction)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(a, b), mask), masked_mean((b > a).float(), mask).detach()


class AdaptiveKLController:
    """Ziegler et al. 2019 sec. 2.2: beta_{t+1} = beta_t (1 + K_beta e_t n / horizon) with the proportional error
    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2); a `target` of None keeps beta fixed."""

    def __init__(self, init_coef: float, target: float | None = None, horizon: int = 10000) -> None:
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        if self.target is not None and self.target > 0:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-position entropy H = -sum p log p of softmax(logits) [..., V] -> [...], in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
