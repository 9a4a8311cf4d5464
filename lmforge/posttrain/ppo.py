"""`lmforge ppo`: RLHF with PPO (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

The policy carries a value head on its last hidden state. Each rollout samples completions, scores the
whole completion (`posttrain.rewards`: verifiers, a reward model, a user function), and turns it into
per-token rewards: the score on the last token minus beta * (log pi - log ref) on every token, so the KL
penalty is paid where the policy drifts. GAE (gamma, lambda) gives advantages (whitened per rollout) and
value targets; the policy and value losses are both clipped, and each rollout is reused for several PPO
epochs. beta is fixed, or adapted toward a KL target by Ziegler's proportional controller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.core.config import option, require
from lmforge.model.transformer import Transformer
from lmforge.posttrain.models import scalar_head
from lmforge.posttrain.rl import PolicyOptimizationConfig, RLStage
from lmforge.posttrain.rl_losses import (
    AdaptiveKLController,
    clipped_surrogate,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    masked_mean,
    whiten,
)
from lmforge.posttrain.rollout import Rollout, model_token_logps, token_logps
from lmforge.posttrain.stage import run_dir_option


class PolicyWithValue(nn.Module):
    """The policy Transformer plus a scalar value head V(s_t) read from the same final hidden states."""

    def __init__(self, policy: Transformer) -> None:
        super().__init__()
        self.policy = policy
        self.cfg = policy.cfg  # train_loop checkpoints need it
        self.value_head = scalar_head(policy.cfg.d_model)  # V = 0 before training

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(logits [B, T, V], values [B, T]); values[t] estimates the return from the state ending at t."""
        h = self.policy(input_ids, return_hidden=True)
        return self.policy.lm_head(h), self.value_head(h).squeeze(-1).float().clone()  # no view (FSDP's hooks)


@torch.no_grad()
def model_values(model: PolicyWithValue, ids: Tensor, batch_size: int = 64) -> Tensor:
    device = next(model.parameters()).device
    return torch.cat([model(ids[i:i + batch_size].to(device))[1].cpu() for i in range(0, len(ids), batch_size)])


def kl_shaped_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards r_t = -beta (log pi - log ref)_t, plus the sequence score on its last token
    (Ziegler et al. 2019 eq. 2, per token as in Stiennon et al. 2020)."""
    rewards = -kl_coef * (logps - ref_logps) * mask
    last = (mask * torch.arange(mask.shape[1])).argmax(1)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


@dataclass
class PpoConfig(PolicyOptimizationConfig):
    run_dir: str = run_dir_option("runs/ppo")
    samples_per_prompt: int = option(4, "completions sampled per prompt")
    value_clip: float = option(0.2, "clip range of the value update")
    vf_coef: float = option(0.1, "weight of the value loss")
    gamma: float = option(1.0, "discount of GAE")
    lam: float = option(0.95, "lambda of GAE")
    kl_target: float = option(0.0, "adaptive controller's KL target (Ziegler 2019: 6 nats); 0 keeps beta fixed")
    kl_horizon: int = option(10000, "adaptive controller's horizon (samples)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.samples_per_prompt >= 1, "samples_per_prompt", self.samples_per_prompt, ">= 1")
        require(0 <= self.gamma <= 1, "gamma", self.gamma, "in [0, 1]")
        require(0 <= self.lam <= 1, "lam", self.lam, "in [0, 1]")
        require(self.kl_target >= 0, "kl_target", self.kl_target, ">= 0")


def run_ppo(cfg: PpoConfig) -> dict[str, Any]:
    """Train with PPO; returns the held-out greedy reward (and exact match) before and after, and the final KL
    coefficient."""
    with RLStage("ppo", cfg, samples=cfg.samples_per_prompt) as rl:
        ref = rl.ref
        assert ref is not None  # PPO always loads one (with_reference)
        model = PolicyWithValue(rl.policy).to(rl.device)
        kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon)
        temperature = cfg.sampling.temperature

        def make_rollout(index: int) -> Rollout:
            batch = rl.rollout(index, cfg.samples_per_prompt)  # this rank's prompts
            batch["ref_logps"] = model_token_logps(ref, batch["input_ids"], batch["labels"], temperature)
            batch["old_values"] = model_values(model, batch["input_ids"]) * batch["mask"]
            batch = rl.gather_rollout(batch)  # the whole rollout, on every rank
            mask, ref_logps, values = batch["mask"], batch.pop("ref_logps"), batch["old_values"]
            kl = ((batch["old_logps"] - ref_logps) * mask).sum(1)  # per-sequence KL estimate
            beta = kl_ctl.value
            rewards = kl_shaped_rewards(batch["rewards"], batch["old_logps"], ref_logps, mask, beta)
            advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
            kl_ctl.update(kl.mean().item(), len(kl))  # the whole rollout's: every rank's beta alike
            n = len(kl)
            return {**batch, "returns": returns, "advantages": whiten(advantages, mask), "seq_kl": kl,
                    "kl_coef": torch.full((n,), beta)}

        def loss_fn(m: PolicyWithValue, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
            logits, values = m(batch["input_ids"])
            logits = logits / temperature  # the sampling policy: ratios at its temperature
            logps = token_logps(logits, batch["labels"])
            mask = batch["mask"]
            pg, clipped = clipped_surrogate(logps, batch["old_logps"], batch["advantages"], cfg.clip_eps)
            pg_loss = masked_mean(pg, mask)
            vf_loss, vf_clip = clipped_value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip)
            entropy = masked_mean(entropy_from_logits(logits.detach()), mask)
            loss = pg_loss + cfg.vf_coef * vf_loss  # token means; a rank's slice scales them to the minibatch's
            return loss * batch.get("token_scale", 1.0), {
                "reward": batch["rewards"].mean().item(), "kl": batch["seq_kl"].mean().item(),
                "kl_coef": batch["kl_coef"].mean().item(), "entropy": entropy.item(),
                "clip_frac": masked_mean(clipped, mask).item(), "value_loss": vf_loss.item(),
                "value_clip_frac": vf_clip.item()}

        return rl.optimize(model, loss_fn, make_rollout, cfg.samples_per_prompt,
                           extra=lambda: {"kl_coef": kl_ctl.value}, wrap=PolicyWithValue)
