"""Preference-optimization losses as pure functions of log-probabilities.

Trainers (SFT/RM/DPO loops) compute per-sequence log-probabilities with `sequence_logps` and hand
them to one of these functions; nothing here touches a model, an optimizer or a config, so each
loss can be checked against hand-computed numbers.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.core.tensors import IGNORE_INDEX

DPOLossType = Literal["sigmoid", "ipo", "hinge"]
"""Loss types `dpo_loss` accepts; a trainer config can use this as its field type (validated by config)."""


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, average: bool = False) -> Tensor:
    """Per-sequence log p(y | x) = sum_t log p(y_t | y_<t, x) over positions whose label is not ignored.

    `logits` [B, T, V] and `labels` [B, T] are already aligned (labels are the next tokens), as for
    `causal_lm_loss`; prompt and padding positions carry `ignore_index`, so only the response counts.
    `average=True` divides by the number of counted tokens: SimPO's length-normalized reward
    (Meng et al. 2024, eq. 4). The log-softmax runs in fp32 for stability under autocast.
    Returns a [B] fp32 tensor; a sequence with no counted token gets 0.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align as [B,T,V]/[B,T]")
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    summed = (token_logps * mask).sum(-1)
    if average:
        return summed / mask.sum(-1).clamp(min=1)
    return summed


def _smoothed_logsigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1-eps) log sigma(z) - eps log sigma(-z): the preference label is flipped with probability eps (cDPO)."""
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, loss_type: DPOLossType = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference losses on h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)).

    - "sigmoid": DPO, Rafailov et al. 2023 eq. 7: -log sigma(beta h). With `label_smoothing` eps > 0 it
      is conservative DPO (cDPO, Mitchell 2023): -(1-eps) log sigma(beta h) - eps log sigma(-beta h).
    - "ipo": IPO, Azar et al. 2023 eq. 17 (empirical IPO loss): (h - 1/(2 beta))^2, which keeps h bounded instead of
      pushing it to infinity when preferences are deterministic. The target 1/(2 beta) is per token: pass
      log-probs averaged over each response's tokens (`sequence_logps(..., average=True)`, as `lmforge dpo` does
      for ipo), which is TRL's DPO/CPO IPO (summed log-ratios divided by the completion length).
    - "hinge": SLiC-style hinge, Zhao et al. 2023: relu(1 - beta h).

    Returns (per-example losses, chosen_rewards, rejected_rewards); the implicit rewards
    beta * (log pi - log ref) (DPO eq. 5, up to the partition term) are detached: they are for logging.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = _smoothed_logsigmoid_loss(beta * h, label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        raise ValueError(f"loss_type must be one of {', '.join(get_args(DPOLossType))}, got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float = 2.0,
               gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO, Meng et al. 2024 eq. 6: -log sigma(beta * (avg log pi(y_w) - avg log pi(y_l)) - gamma).

    Reference-free: the reward is the length-normalized policy log-likelihood, so the caller passes
    `sequence_logps(..., average=True)`. The target margin is gamma = gamma_beta_ratio * beta.
    `label_smoothing` smooths the label as in cDPO. Returns (per-example losses, chosen_rewards,
    rejected_rewards) with rewards beta * avg log pi (eq. 4), detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logits = beta * ((policy_chosen_logps - policy_rejected_logps) - gamma_beta_ratio)
    losses = _smoothed_logsigmoid_loss(logits, label_smoothing)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean(log pi(y'|x) - log ref(y'|x))) over mismatched (x, y') pairs of the
    batch (Ethayarajh et al. 2024, sec. 4.1: a biased but low-variance estimate of KL(pi || ref)); detached, as no
    gradient flows through z0."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, reference_point: Tensor | float,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[Tensor, Tensor]:
    """KTO, Ethayarajh et al. 2024 eq. 8, on unpaired examples labelled desirable or undesirable:
    L = w(y) (1 - v(x, y)) with r = log pi(y|x) - log ref(y|x), z0 = `reference_point` (`kto_reference_point`),
    v = sigma(beta (r - z0)) for a desirable y (weight lambda_D) and sigma(beta (z0 - r)) for an undesirable one
    (weight lambda_U). Each example is judged on its own: no pairs are needed.

    Returns (per-example losses in input order, implicit rewards beta * r, detached)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    r = policy_logps - ref_logps
    desirable = desirable.bool()
    value = torch.where(desirable, torch.sigmoid(beta * (r - reference_point)),
                        torch.sigmoid(beta * (reference_point - r)))
    weight = torch.where(desirable, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    return weight * (1.0 - value), beta * r.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float = 0.1
              ) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO's odds-ratio term, Hong et al. 2024 eqs. 4-7, reference-free: with P = exp(mean token log p(y|x))
    (pass `sequence_logps(..., average=True)`) and odds(y) = P / (1 - P),
    L_OR = -log sigma(log odds(y_w) - log odds(y_l)), weighted by lambda = `beta`. The full ORPO objective
    (eq. 6) adds the SFT loss on the chosen response: L = L_SFT + lambda L_OR.

    Returns (per-example lambda * L_OR, chosen rewards beta * avg log pi(y_w), rejected rewards), rewards detached."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen, rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -beta * F.logsigmoid(log_odds), beta * chosen.detach(), beta * rejected.detach()


def reward_pair_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None) -> Tensor:
    """Bradley-Terry pairwise reward-model loss, per example: -log sigma(r_w - r_l - m).

    Ouyang et al. 2022 (InstructGPT) eq. 1 without the margin; LLaMA 2 (Touvron et al. 2023, eq. 2)
    subtracts a margin m that grows with how strongly annotators preferred y_w.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def reward_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> float:
    """Fraction of pairs whose chosen reward is strictly higher than the rejected one (ties count as wrong)."""
    if chosen_rewards.numel() == 0:
        raise ValueError("reward_accuracy needs at least one pair")
    return (chosen_rewards > rejected_rewards).float().mean().item()
