"""`lmforge grpo`: Group Relative Policy Optimization with verifiable rewards (Shao et al. 2024, DeepSeekMath).

Each rollout samples G completions of every prompt with the current policy (`generate_batch`), scores
them with the task verifier (`tasks.task_reward`, exact match) or a reward model, and gives each one
the advantage (r - mean_group) / (std_group + eps): no value network. The policy then takes several
clipped-objective steps on the rollout (`epochs` x `minibatches`), optionally pulled toward the frozen
reference by the k3 KL estimate. One optimizer step of `train_loop` = one minibatch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lmforge.core.config import option, save_config
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.generate.sampling import SamplingParams
from lmforge.model.transformer import Transformer
from lmforge.peft.config import PeftConfig, apply_peft
from lmforge.posttrain.models import load_policy, load_reference, pad_id_of, save_result
from lmforge.posttrain.reward import load_reward_model, score_texts
from lmforge.posttrain.rl_losses import entropy_from_logits, group_advantages, grpo_loss, masked_mean
from lmforge.posttrain.rollout import (
    Rollout,
    RolloutBatches,
    heldout_exact_match,
    model_token_logps,
    pack_sequences,
    sample_completions,
    task_prompt_ids,
    token_logps,
)
from lmforge.tasks.suite import TASK_KINDS, TaskExample, make_examples, task_reward
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import train_loop


def rl_train_defaults() -> TrainConfig:
    return TrainConfig(steps=40, lr=2e-5, warmup_steps=0, weight_decay=0.0, min_lr_ratio=1.0, log_every=4,
                       eval_every=20, save_every=0, plot_every=0)


@dataclass
class RolloutConfig:
    """What PPO and GRPO share: prompts from the task suite, sampling, reward source, evaluation."""

    kinds: list[str] = option(default_factory=lambda: list(TASK_KINDS), help="task kinds the prompts come from")
    prompts_per_rollout: int = option(16, "prompts sampled per rollout batch")
    max_new_tokens: int = option(16, "longest completion")
    temperature: float = option(1.0, "sampling temperature of rollouts")
    top_k: int = option(0, "sample among the k most likely tokens; 0 keeps all")
    reward: Literal["task", "model"] = option("task", "task = exact-match verifier; model = reward_model's score")
    reward_model: str = option("", "directory from `lmforge reward` (reward = model)")
    eval_prompts: int = option(120, "held-out task prompts for greedy exact match (0 skips)")

    def __post_init__(self) -> None:
        if self.prompts_per_rollout < 1 or self.max_new_tokens < 1:
            raise ConfigError("prompts_per_rollout and max_new_tokens must be >= 1")
        if self.reward == "model" and not self.reward_model:
            raise ConfigError("reward = model needs reward_model (a directory from `lmforge reward`)")


@dataclass
class PolicyOptimizationConfig:
    """What PPO and GRPO share: the policy, its reference, rollouts, the clipped-update schedule, output."""

    checkpoint: str = option("", "policy init: a model directory with tokenizer.json (e.g. RUN/model of `lmforge sft`)")
    ref_checkpoint: str = option("", "frozen reference for the KL term; empty = the policy's initial weights")
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "prompts, sampling, reward"})
    epochs: int = option(2, "passes (mu) over each rollout batch")
    minibatches: int = option(2, "optimizer steps per pass over a rollout batch")
    clip_eps: float = option(0.2, "PPO clip range epsilon of the ratio pi/pi_old")
    kl_coef: float = option(0.05, "beta of the KL penalty toward the reference")
    seed: int = option(0, "seed of prompts and sampling")
    run_dir: str = option("runs/rl", "checkpoints, metrics and RUN/model")
    resume: bool = option(False, "continue from RUN/checkpoints/latest")
    train: TrainConfig = field(default_factory=rl_train_defaults,
                               metadata={"help": "optimization (a step = a minibatch)"})
    peft: PeftConfig = field(default_factory=PeftConfig, metadata={"help": "parameter-efficient fine-tuning"})

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.minibatches < 1:
            raise ConfigError("epochs and minibatches must be >= 1")
        if self.clip_eps <= 0:
            raise ConfigError(f"clip_eps must be > 0, got {self.clip_eps}")


@dataclass
class GrpoConfig(PolicyOptimizationConfig):
    run_dir: str = option("runs/grpo", "checkpoints, metrics and RUN/model")
    group_size: int = option(8, "G: completions sampled per prompt; advantages are relative within the group")
    kl_coef: float = option(0.04, "beta of the k3 KL to the reference (DeepSeekMath: 0.04); 0 loads no reference")
    loss_norm: Literal["sequence", "token"] = option("sequence", "sequence: mean over each completion, then over "
                                                                 "completions (GRPO); token: over all tokens (DAPO)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (samples of a prompt are compared), "
                              f"got {self.group_size}")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")


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


def sample_rollout(policy: nn.Module, tokenizer: Tokenizer, cfg: RolloutConfig, examples: list[TaskExample],
                   n: int, scorer: Scorer, seed: int) -> tuple[dict[str, Tensor], list[str]]:
    """n completions per example, packed: input_ids, labels, mask, old_logps, rewards (per sequence)."""
    params = SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens)
    prompts = task_prompt_ids(tokenizer, examples)
    tokens, texts = sample_completions(policy, tokenizer, prompts, params, n, seed=seed)
    repeated = [p for p in prompts for _ in range(n)]
    ids, labels = pack_sequences(repeated, tokens, pad_id_of(tokenizer))
    rewards = scorer([ex for ex in examples for _ in range(n)], texts).float()
    return {"input_ids": ids, "labels": labels, "mask": (labels != IGNORE_INDEX).float(),
            "old_logps": model_token_logps(policy, ids, labels), "rewards": rewards}, texts


def run_grpo(cfg: GrpoConfig) -> dict[str, Any]:
    """Train with GRPO; returns held-out greedy exact match before and after, and the last rollout metrics."""
    policy, tokenizer = load_policy(cfg.checkpoint, cfg.train.device)
    device = next(policy.parameters()).device
    ref = load_reference(cfg.ref_checkpoint, policy, tokenizer) if cfg.kl_coef > 0 else None
    scorer = Scorer(cfg.rollout, tokenizer, device)
    heldout = make_examples(cfg.rollout.eval_prompts, seed=2 * cfg.seed + 1, kinds=cfg.rollout.kinds)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    before = heldout_exact_match(policy, tokenizer, heldout, cfg.rollout.max_new_tokens) if heldout else None
    apply_peft(policy, cfg.peft)

    def make_rollout(index: int) -> Rollout:
        examples = rollout_prompts(cfg.rollout, cfg.seed, index)
        batch, _ = sample_rollout(policy, tokenizer, cfg.rollout, examples, cfg.group_size, scorer,
                                  seed=cfg.seed * 1_000_003 + index)
        batch["advantages"] = group_advantages(batch["rewards"], cfg.group_size)
        if ref is not None:
            batch["ref_logps"] = model_token_logps(ref, batch["input_ids"], batch["labels"])
        return batch

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch["input_ids"])
        logps = token_logps(logits, batch["labels"])
        mask = batch["mask"]
        loss, stats = grpo_loss(logps, batch["old_logps"], batch.get("ref_logps"), batch["advantages"], mask,
                                cfg.clip_eps, cfg.kl_coef, cfg.loss_norm)
        entropy = masked_mean(entropy_from_logits(logits.detach()), mask)
        return loss, {"reward": batch["rewards"].mean().item(), "kl": stats["kl"].item(),
                      "clip_frac": stats["clip_frac"].item(), "entropy": entropy.item(),
                      "completion_len": mask.sum(1).mean().item()}

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"heldout_exact_match": heldout_exact_match(model, tokenizer, heldout, cfg.rollout.max_new_tokens)}

    n = cfg.rollout.prompts_per_rollout * cfg.group_size
    if n < cfg.minibatches:
        raise LmforgeError(f"a rollout of {n} completions cannot split into {cfg.minibatches} minibatches")
    return optimize_policy("grpo", cfg, policy, policy, loss_fn, make_rollout, evaluate if heldout else None,
                           before, cfg.group_size)


def optimize_policy(name: str, cfg: PolicyOptimizationConfig, model: nn.Module, policy: Transformer,
                    loss_fn: Any, make_rollout: Any, evaluate: Any, before: float | None, samples: int,
                    extra: Any = None) -> dict[str, Any]:
    """The loop PPO and GRPO share: rollouts as resumable batches through `train_loop`, then the policy saved.

    `model` is what trains (the policy, or the policy with a value head); `extra()` adds result fields."""
    print(f"{name}: {cfg.rollout.prompts_per_rollout} prompts x {samples} samples per rollout, "
          f"{cfg.epochs} epochs x {cfg.minibatches} minibatches, kl_coef {cfg.kl_coef}; held-out exact match "
          f"before {before}", file=sys.stderr)
    run_dir = Path(cfg.run_dir)
    batches = RolloutBatches(make_rollout, cfg.epochs, cfg.minibatches, seed=cfg.seed)
    result = train_loop(model, loss_fn, batches, cfg.train, run_dir, resume=cfg.resume, desc=name, evaluate=evaluate)
    model_dir = save_result(policy, cfg.peft, run_dir / "model", cfg.checkpoint)
    out = {"heldout_exact_match_before": before, "heldout_exact_match": result.get("heldout_exact_match"),
           **(extra() if extra else {}), "rollouts": batches.index, "final_loss": result["final_loss"],
           "steps": result["steps"], "model_dir": str(model_dir)}
    print(f"{name}: held-out exact match {before} -> {out['heldout_exact_match']} -> {model_dir}")
    return out
