"""`lmforge grpo`: Group Relative Policy Optimization with verifiable rewards (Shao et al. 2024, DeepSeekMath).

Each rollout samples G completions of every prompt with the current policy (`generate_batch`), scores
them with the configured reward (`posttrain.rewards`: built-in verifiers, a reward model, a user function),
and gives each one
the advantage (r - mean_group) / (std_group + eps), or with `advantage = rloo` the leave-one-out
r - mean(other samples of the prompt) (RLOO): no value network. The policy then takes several
clipped-objective steps on the rollout (`epochs` x `minibatches`), optionally pulled toward the frozen
reference by the k3 KL estimate. One optimizer step of `train_loop` = one minibatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from lmforge.core.config import option, require
from lmforge.posttrain.rl import PolicyOptimizationConfig, RLStage
from lmforge.posttrain.rl_losses import (
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    masked_mean,
    rloo_advantages,
)
from lmforge.posttrain.rollout import Rollout, model_token_logps, token_logps
from lmforge.posttrain.stage import run_dir_option


@dataclass
class GrpoConfig(PolicyOptimizationConfig):
    run_dir: str = run_dir_option("runs/grpo")
    group_size: int = option(8, "G: completions sampled per prompt; advantages are relative within the group")
    kl_coef: float = option(0.04, "beta of the k3 KL to the reference (DeepSeekMath: 0.04); 0 loads no reference")
    advantage: Literal["group", "rloo"] = option("group", "group: (r - mean) / std within each group (GRPO); rloo: "
                                                          "r minus the mean of the other samples of its prompt "
                                                          "(RLOO, Ahmadian et al. 2024)")
    loss_norm: Literal["sequence", "token"] = option("sequence", "sequence: mean over each completion, then over "
                                                                 "completions (GRPO); token: over all tokens (DAPO)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.group_size >= 2, "group_size", self.group_size, ">= 2 (samples of a prompt are compared)")
        n = self.rollout.prompts_per_rollout * self.group_size
        require(self.minibatches <= n, "minibatches", self.minibatches, f"at most the {n} completions of a rollout")


def run_grpo(cfg: GrpoConfig) -> dict[str, Any]:
    """Train with GRPO; returns the held-out greedy reward (and exact match) before and after."""
    with RLStage("grpo", cfg, with_reference=cfg.kl_coef > 0, samples=cfg.group_size) as rl:
        temperature = cfg.sampling.temperature

        def make_rollout(index: int) -> Rollout:
            batch = rl.rollout(index, cfg.group_size)  # this rank's groups
            if rl.ref is not None:
                batch["ref_logps"] = model_token_logps(rl.ref, batch["input_ids"], batch["labels"], temperature)
            batch = rl.gather_rollout(batch)
            advantages = rloo_advantages if cfg.advantage == "rloo" else group_advantages
            batch["advantages"] = advantages(batch["rewards"], cfg.group_size)
            return batch

        def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
            logits = model(batch["input_ids"]) / temperature  # the sampling policy: ratios and KL at its temperature
            logps = token_logps(logits, batch["labels"])
            mask = batch["mask"]
            loss, stats = grpo_loss(logps, batch["old_logps"], batch.get("ref_logps"), batch["advantages"], mask,
                                    cfg.clip_eps, cfg.kl_coef, cfg.loss_norm)
            if "row_scale" in batch:  # a rank's slice of the minibatch (RolloutBatches.rank_slice)
                loss = loss * batch["row_scale" if cfg.loss_norm == "sequence" else "token_scale"]
            entropy = masked_mean(entropy_from_logits(logits.detach()), mask)
            logged = {"reward": batch["rewards"].mean().item(), "kl": stats["kl"].item(),
                      "clip_frac": stats["clip_frac"].item(), "entropy": entropy.item(),
                      "completion_len": mask.sum(1).mean().item()}
            for key in ("correct", "think_tokens"):  # the reasoning task: accuracy and chain-of-thought length
                if key in batch:
                    logged["accuracy" if key == "correct" else key] = batch[key].float().mean().item()
            return loss, logged

        return rl.optimize(rl.policy, loss_fn, make_rollout, cfg.group_size)
