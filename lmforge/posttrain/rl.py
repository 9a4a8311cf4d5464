"""What the on-policy RL stages (PPO, GRPO) share: their config, the scorer, rollouts and the optimization run.

An RL stage is a `Stage` that also holds a frozen reference, a scorer (task verifier or reward model)
and held-out task prompts; `RLStage.rollout` samples and scores completions of fresh task prompts, and
`RLStage.optimize` feeds the algorithm's rollouts through `train_loop` as resumable minibatches
(`RolloutBatches`), then saves the policy. An algorithm file adds its config fields, what it computes
on a rollout (advantages, values, reference log-probs) and its loss.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lmforge.core.config import option, require
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.generate.sampling import SamplingParams
from lmforge.posttrain.models import pad_id_of
from lmforge.posttrain.reward import load_reward_model, score_texts
from lmforge.posttrain.rollout import (
    Rollout,
    RolloutBatches,
    heldout_exact_match,
    model_token_logps,
    pack_sequences,
    sample_completions,
    task_prompt_ids,
)
from lmforge.posttrain.stage import Stage, StageConfig, before_after, summary, train_option
from lmforge.tasks.suite import TASK_KINDS, TaskExample, make_examples, task_reward
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import LossFn, TrainConfig


@dataclass
class RolloutConfig:
    """Where rollout prompts and rewards come from, and the held-out evaluation."""

    kinds: list[str] = option(default_factory=lambda: list(TASK_KINDS), help="task kinds the prompts come from")
    prompts_per_rollout: int = option(16, "prompts sampled per rollout batch")
    reward: Literal["task", "model"] = option("task", "task = exact-match verifier; model = reward_model's score")
    reward_model: str = option("", "directory from `lmforge reward` (reward = model)")
    eval_prompts: int = option(120, "held-out task prompts for greedy exact match (0 skips)")

    def __post_init__(self) -> None:
        require(self.prompts_per_rollout >= 1, "prompts_per_rollout", self.prompts_per_rollout, ">= 1")
        require(self.reward != "model" or bool(self.reward_model), "reward_model", self.reward_model,
                "a directory from `lmforge reward` when reward = model")


@dataclass
class PolicyOptimizationConfig(StageConfig):
    """What PPO and GRPO share: the reference, rollouts and their sampling, the clipped-update schedule."""

    train: TrainConfig = train_option("optimization (a step = a minibatch)", steps=40, lr=2e-5, warmup_steps=0,
                                      weight_decay=0.0, min_lr_ratio=1.0, log_every=4, eval_every=20,
                                      save_every=0, plot_every=0)
    ref_checkpoint: str = option("", "frozen reference for the KL term; empty = the policy's initial weights")
    rollout: RolloutConfig = option(default_factory=RolloutConfig, help="prompts, reward, evaluation")
    sampling: SamplingParams = option(default_factory=lambda: SamplingParams(max_new_tokens=16),
                                      help="how rollout completions are sampled (max_new_tokens also bounds the "
                                           "greedy held-out evaluation; rollouts are seeded from `seed`)")
    epochs: int = option(2, "passes (mu) over each rollout batch")
    minibatches: int = option(2, "optimizer steps per pass over a rollout batch")
    clip_eps: float = option(0.2, "PPO clip range epsilon of the ratio pi/pi_old")
    kl_coef: float = option(0.05, "beta of the KL penalty toward the reference (PPO: its initial value)")

    def __post_init__(self) -> None:
        require(self.sampling.max_new_tokens >= 1, "sampling.max_new_tokens", self.sampling.max_new_tokens, ">= 1")
        require(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        require(self.minibatches >= 1, "minibatches", self.minibatches, ">= 1")
        require(self.clip_eps > 0, "clip_eps", self.clip_eps, "> 0")
        require(self.kl_coef >= 0, "kl_coef", self.kl_coef, ">= 0")


class Scorer:
    """Reward of a batch of completions: the task verifier or a reward model."""

    def __init__(self, cfg: RolloutConfig, tokenizer: Tokenizer, device: torch.device) -> None:
        self.tokenizer, self.rm = tokenizer, None
        if cfg.reward == "model":
            self.rm = load_reward_model(cfg.reward_model, device=device)

    def __call__(self, examples: list[TaskExample], texts: list[str]) -> Tensor:
        if self.rm is None:
            return torch.tensor([task_reward(ex, t) for ex, t in zip(examples, texts)])
        prompts = [[{"role": "user", "content": ex.prompt}] for ex in examples]
        return torch.tensor(score_texts(self.rm, self.tokenizer, prompts, texts))


def rollout_prompts(cfg: RolloutConfig, seed: int, index: int) -> list[TaskExample]:
    """Fresh training prompts for rollout `index` (even seeds: the train half of the prompt space)."""
    return make_examples(cfg.prompts_per_rollout, seed=2 * (seed * 1_000_003 + index), kinds=cfg.kinds)


def sample_rollout(policy: nn.Module, tokenizer: Tokenizer, params: SamplingParams, examples: list[TaskExample],
                   n: int, scorer: Scorer, seed: int) -> tuple[dict[str, Tensor], list[str]]:
    """n completions per example, packed: input_ids, labels, mask, old_logps, rewards (per sequence)."""
    prompts = task_prompt_ids(tokenizer, examples)
    tokens, texts = sample_completions(policy, tokenizer, prompts, params, n, seed=seed)
    repeated = [p for p in prompts for _ in range(n)]
    ids, labels = pack_sequences(repeated, tokens, pad_id_of(tokenizer))
    rewards = scorer([ex for ex in examples for _ in range(n)], texts).float()
    return {"input_ids": ids, "labels": labels, "mask": (labels != IGNORE_INDEX).float(),
            "old_logps": model_token_logps(policy, ids, labels), "rewards": rewards}, texts


class RLStage(Stage):
    """A `Stage` set up for on-policy RL: on construction it loads the reference (when asked for), the
    scorer and the held-out prompts, opens RUN, measures held-out exact match, then applies PEFT."""

    cfg: PolicyOptimizationConfig

    def __init__(self, name: str, cfg: PolicyOptimizationConfig, with_reference: bool = True) -> None:
        super().__init__(name, cfg)
        self.ref = self.reference(cfg.ref_checkpoint) if with_reference else None
        self.scorer = Scorer(cfg.rollout, self.tokenizer, self.device)
        self.heldout = make_examples(cfg.rollout.eval_prompts, seed=2 * cfg.seed + 1, kinds=cfg.rollout.kinds)
        self.open()
        self.before = self.exact_match() if self.heldout else None
        self.add_peft()

    def exact_match(self) -> float:
        """Greedy exact match of the policy on the held-out task prompts."""
        return heldout_exact_match(self.policy, self.tokenizer, self.heldout, self.cfg.sampling.max_new_tokens)

    def rollout(self, index: int, samples: int) -> dict[str, Tensor]:
        """Rollout `index`: `samples` completions of each of its fresh prompts, scored (see `sample_rollout`)."""
        examples = rollout_prompts(self.cfg.rollout, self.cfg.seed, index)
        batch, _ = sample_rollout(self.policy, self.tokenizer, self.cfg.sampling, examples, samples, self.scorer,
                                  seed=self.cfg.seed * 1_000_003 + index)
        return batch

    def optimize(self, model: nn.Module, loss_fn: LossFn, make_rollout: Callable[[int], Rollout], samples: int,
                 extra: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """Rollouts as resumable minibatches through `train_loop`, then the policy saved.

        `model` is what trains (the policy, or the policy with a value head); `extra()` adds result fields."""
        cfg = self.cfg
        print(f"{self.name}: {cfg.rollout.prompts_per_rollout} prompts x {samples} samples per rollout, "
              f"{cfg.epochs} epochs x {cfg.minibatches} minibatches, kl_coef {cfg.kl_coef}; held-out exact match "
              f"before {self.before}", file=sys.stderr)
        batches = RolloutBatches(make_rollout, cfg.epochs, cfg.minibatches, seed=cfg.seed)
        evaluate = (lambda m: {"heldout_exact_match": self.exact_match()}) if self.heldout else None
        result = self.fit(model, loss_fn, batches, evaluate)
        model_dir = self.save()
        out = summary(result, model_dir, **before_after({"heldout_exact_match": self.before}, result),
                      **(extra() if extra else {}), rollouts=batches.index)
        print(f"{self.name}: held-out exact match {self.before} -> {out['heldout_exact_match']} -> {model_dir}")
        return out
