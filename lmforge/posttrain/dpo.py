"""`lmforge dpo`: direct preference optimization (and IPO, hinge, cDPO, SimPO, ORPO) on preference pairs.

The reference model's log-probs of every chosen/rejected response are computed ONCE, before training,
and travel with the batches; the reference is then freed, so a DPO step costs one policy forward pass
(chosen and rejected rows together) - the same trick TRL's `precompute_ref_log_probs` uses. SimPO and ORPO
need no reference at all. The losses themselves live in `lmforge.posttrain.losses` (tested against TRL).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lmforge.core.config import option, require
from lmforge.posttrain import losses
from lmforge.posttrain.losses import DPOLossType, orpo_loss, sequence_logps, simpo_loss
from lmforge.posttrain.pairs import EncodedPair, PairBatches, PairStageConfig, load_pairs, score_pairs
from lmforge.posttrain.stage import Stage, before_after, run_dir_option, summary, train_option
from lmforge.train.config import TrainConfig


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, loss_type: DPOLossType = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(per-example losses, chosen implicit rewards, rejected implicit rewards); see `losses.dpo_loss`."""
    return losses.dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                           beta, loss_type, label_smoothing)


@dataclass
class DpoConfig(PairStageConfig):
    run_dir: str = run_dir_option("runs/dpo")
    train: TrainConfig = train_option(steps=200, lr=5e-5, warmup_steps=10, weight_decay=0.0, log_every=10,
                                      eval_every=50, save_every=0, plot_every=0)
    ref_checkpoint: str = option("", "reference model directory; empty = the policy's initial weights")
    beta: float = option(0.1, "DPO beta: strength of the implicit KL to the reference (SimPO's beta with simpo)")
    loss_type: DPOLossType = option("sigmoid", "sigmoid (DPO), ipo (IPO) or hinge (SLiC)")
    label_smoothing: float = option(0.0, "conservative DPO / SimPO: probability that a preference label is flipped")
    simpo: bool = option(False, "SimPO: reference-free, length-normalized log-probs (then beta ~2, see gamma)")
    simpo_gamma_ratio: float = option(0.5, "SimPO target margin gamma as a fraction of beta")
    orpo: bool = option(False, "ORPO: reference-free, SFT loss on the chosen response + beta x the odds-ratio loss "
                               "(Hong et al. 2024; beta is its lambda, ~0.1)")

    @property
    def average_logps(self) -> bool:
        """Whether responses are scored by their mean token log-prob: SimPO's reward, ORPO's odds, IPO's target."""
        return self.simpo or self.orpo or self.loss_type == "ipo"

    @property
    def reference_free(self) -> bool:
        return self.simpo or self.orpo

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta > 0, "beta", self.beta, "> 0")
        require(0 <= self.label_smoothing <= 0.5, "label_smoothing", self.label_smoothing, "in [0, 0.5]")
        require(not (self.simpo and self.orpo), "orpo", self.orpo, "false when simpo is true (pick one)")
        require(not self.orpo or self.label_smoothing == 0, "label_smoothing", self.label_smoothing,
                "0 with orpo (ORPO has no label smoothing)")


def pair_logps(model: nn.Module, input_ids: Tensor, labels: Tensor, average: bool = False) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) response log-probs [B] of a `collate_pairs` batch, one forward pass."""
    return sequence_logps(model(input_ids), labels, average=average).chunk(2)


def precompute_logps(model: nn.Module, pairs: list[EncodedPair], pad_id: int, average: bool = False,
                     batch_size: int = 32) -> Tensor:
    """[N, 2] (chosen, rejected) log-probs of `model`: the reference's, computed once before training."""
    return score_pairs(model, lambda ids, labels: pair_logps(model, ids, labels, average), pairs, pad_id, batch_size)


def preference_loss(cfg: DpoConfig, chosen: Tensor, rejected: Tensor, ref: Tensor | None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    if cfg.simpo:
        return simpo_loss(chosen, rejected, cfg.beta, cfg.simpo_gamma_ratio, cfg.label_smoothing)
    if cfg.orpo:  # eq. 6: the chosen response's NLL (per-token mean) + lambda L_OR
        odds_ratio, cr, rr = orpo_loss(chosen, rejected, cfg.beta)
        return -chosen + odds_ratio, cr, rr
    assert ref is not None
    return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], cfg.beta, cfg.loss_type, cfg.label_smoothing)


def batch_loss(cfg: DpoConfig, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Per-pair losses of a `PairBatches` batch (its "ref" from `precompute_logps` with the same averaging)."""
    chosen, rejected = pair_logps(model, batch["input_ids"], batch["labels"], average=cfg.average_logps)
    loss, cr, rr = preference_loss(cfg, chosen, rejected, batch.get("ref"))
    return loss, preference_metrics(cr, rr, chosen, rejected)


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, chosen: Tensor, rejected: Tensor
                       ) -> dict[str, float]:
    """Implicit rewards, their margin and accuracy, and the raw policy log-prob margin."""
    return {"rewards_chosen": chosen_rewards.mean().item(), "rewards_rejected": rejected_rewards.mean().item(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "logp_margin": (chosen - rejected).detach().mean().item(),
            "preference_accuracy": (chosen > rejected).float().mean().item()}


def preference_stderrs(chosen_rewards: Tensor, rejected_rewards: Tensor, chosen: Tensor, rejected: Tensor
                       ) -> dict[str, float]:
    """Standard errors of the margins and accuracies of `preference_metrics`: the sample standard deviation of
    the per-pair values over sqrt(n) (for an accuracy p that is sqrt(p (1 - p) / (n - 1)), as the eval harness)."""
    per_pair = {"reward_margin": chosen_rewards - rejected_rewards,
                "reward_accuracy": (chosen_rewards > rejected_rewards).float(),
                "logp_margin": chosen - rejected, "preference_accuracy": (chosen > rejected).float()}
    n = chosen.numel()
    return {f"{k}_stderr": (v.detach().float().std() / math.sqrt(n)).item() if n > 1 else 0.0
            for k, v in per_pair.items()}


def evaluate_heldout(cfg: DpoConfig, model: nn.Module, pairs: list[EncodedPair], ref: Tensor | None,
                     pad_id: int) -> dict[str, float]:
    """Held-out: policy log-prob margin log pi(y_w) - log pi(y_l), preference accuracy, implicit rewards, and
    the standard errors of the margins and accuracies (the report draws them as error bars)."""
    policy = precompute_logps(model, pairs, pad_id, average=cfg.average_logps)
    _, cr, rr = preference_loss(cfg, policy[:, 0], policy[:, 1], ref)
    metrics = {**preference_metrics(cr, rr, policy[:, 0], policy[:, 1]),
               **preference_stderrs(cr, rr, policy[:, 0], policy[:, 1])}
    return {f"heldout_{k}": v for k, v in metrics.items()}


def run_dpo(cfg: DpoConfig) -> dict[str, Any]:
    """Train the policy on preference pairs; returns held-out margin/accuracy before and after training."""
    stage = Stage("dpo", cfg)
    train_enc, held_enc = load_pairs(cfg, stage.tokenizer)
    pad_id = stage.pad_id
    ref_train = ref_held = None
    if not cfg.reference_free:
        ref = stage.reference(cfg.ref_checkpoint)
        ref_train = precompute_logps(ref, train_enc, pad_id, average=cfg.average_logps)
        ref_held = precompute_logps(ref, held_enc, pad_id, average=cfg.average_logps)
        del ref  # never needed again: the reference log-probs travel with the batches
    stage.open()
    before = evaluate_heldout(cfg, stage.policy, held_enc, ref_held, pad_id)
    stage.add_peft()

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        loss, metrics = batch_loss(cfg, model, batch)
        return loss.mean(), metrics

    print(f"dpo: {len(train_enc)} training pairs, {len(held_enc)} held out, "
          f"{'SimPO' if cfg.simpo else 'ORPO' if cfg.orpo else cfg.loss_type} beta {cfg.beta}", file=sys.stderr)
    batches = PairBatches(train_enc, cfg.batch_size, pad_id, seed=cfg.seed,
                          extra={} if ref_train is None else {"ref": ref_train})
    result = stage.fit(stage.policy, loss_fn, batches, lambda m: evaluate_heldout(cfg, m, held_enc, ref_held, pad_id))
    model_dir = stage.save()
    out = summary(result, model_dir, **before_after(before, result))
    print(f"dpo: held-out log-prob margin {out['heldout_logp_margin_before']:.3f} -> {out['heldout_logp_margin']:.3f}, "
          f"preference accuracy {out['heldout_preference_accuracy_before']:.3f} -> "
          f"{out['heldout_preference_accuracy']:.3f} -> {model_dir}")
    return out
