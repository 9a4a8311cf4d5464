"""What the on-policy RL stages (PPO, GRPO) share: their config, the scorer, rollouts and the optimization run.

An RL stage is a `Stage` that also holds a frozen reference, a scorer (`posttrain.rewards`: built-in
verifiers, a reward model, the user's function) and its prompts (the user's prompt files, split into train and
held out, or the synthetic task suite); `RLStage.rollout` samples and scores completions of a rollout's prompts,
and
`RLStage.optimize` feeds the algorithm's rollouts through `train_loop` as resumable minibatches
(`RolloutBatches`), then saves the policy. An algorithm file adds its config fields, what it computes
on a rollout (advantages, values, reference log-probs) and its loss.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.core.config import option, require
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.generate.sampling import SamplingParams
from lmforge.posttrain.models import pad_id_of
from lmforge.posttrain.rewards import RewardSource, Scorer, check_rewards
from lmforge.posttrain.rollout import (
    Rollout,
    RolloutBatches,
    chat_prompt_ids,
    greedy_completions,
    model_token_logps,
    pack_sequences,
    sample_completions,
)
from lmforge.posttrain.stage import Stage, StageConfig, before_after, summary, train_option
from lmforge.tasks.prompts import PROMPT_FORMATS, PromptExample, read_prompts, task_prompts
from lmforge.tasks.reasoning import Problem, make_problems, split_reasoning
from lmforge.tasks.suite import TASK_KINDS, make_examples
from lmforge.tasks.verifiers import exact_reward, think_reward
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import LossFn, TrainConfig


@dataclass
class RolloutConfig:
    """How many prompts a rollout samples, and the synthetic task suite used when no prompt file is given."""

    kinds: list[str] = option(default_factory=lambda: list(TASK_KINDS), help="task kinds the prompts come from "
                                                                                "(without prompts files)")
    prompts_per_rollout: int = option(16, "prompts sampled per rollout batch")
    eval_prompts: int = option(120, "held-out task prompts for the greedy evaluation, without prompts files "
                                    "(0 skips)")

    def __post_init__(self) -> None:
        require(self.prompts_per_rollout >= 1, "prompts_per_rollout", self.prompts_per_rollout, ">= 1")


@dataclass
class PolicyOptimizationConfig(RewardSource, StageConfig):
    """What PPO and GRPO share: prompts and reward, the reference, rollouts and their sampling, the clipped-update
    schedule."""

    train: TrainConfig = train_option("optimization (a step = a minibatch)", steps=40, lr=2e-5, warmup_steps=0,
                                      weight_decay=0.0, min_lr_ratio=1.0, log_every=4, eval_every=20,
                                      save_every=0, plot_every=0)
    prompts: list[str] = option(default_factory=list, help="prompt files (JSONL/JSON: alpaca, sharegpt, chat, oasst, "
                                                           "flan, self-instruct, or {prompt, answer}); the last "
                                                           "assistant turn or 'answer' is the reference; empty = the "
                                                           "synthetic task suite")
    format: str = option("auto", "format of the prompt files (auto recognizes each record; prompt = {prompt, answer})")
    task: str = option("suite", "prompts without prompt files: suite (the synthetic task suite, rollout.kinds) or "
                                "reasoning (the multi-step <think> family of `lmforge reasoning data`; reward "
                                "defaults to its verifier, think; metrics log accuracy and think_tokens)")
    heldout: float = option(0.1, "fraction of the prompt files' prompts held out for the greedy evaluation")
    ref_checkpoint: str = option("", "frozen reference for the KL term; empty = the policy's initial weights")
    rollout: RolloutConfig = option(default_factory=RolloutConfig, help="prompts per rollout, synthetic tasks")
    sampling: SamplingParams = option(default_factory=lambda: SamplingParams(max_new_tokens=16),
                                      help="how rollout completions are sampled (max_new_tokens also bounds the "
                                           "greedy held-out evaluation; rollouts are seeded from `seed`)")
    epochs: int = option(2, "passes (mu) over each rollout batch")
    minibatches: int = option(2, "optimizer steps per pass over a rollout batch")
    clip_eps: float = option(0.2, "PPO clip range epsilon of the ratio pi/pi_old")
    kl_coef: float = option(0.05, "beta of the KL penalty toward the reference (PPO: its initial value)")

    def __post_init__(self) -> None:
        require(self.task in ("suite", "reasoning"), "task", self.task, "suite or reasoning")
        if self.task == "reasoning" and not self.reward and not self.reward_model:
            self.reward = ["think"]
        check_rewards(self)
        require(self.format in PROMPT_FORMATS, "format", self.format, f"one of {', '.join(PROMPT_FORMATS)}")
        require(0 <= self.heldout < 1, "heldout", self.heldout, "in [0, 1)")
        require(not self.sampling.is_greedy, "sampling.temperature", self.sampling.temperature,
                "> 0 and sampling.greedy false (on-policy RL compares sampled completions)")
        require(self.sampling.max_new_tokens >= 1, "sampling.max_new_tokens", self.sampling.max_new_tokens, ">= 1")
        require(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        require(self.minibatches >= 1, "minibatches", self.minibatches, ">= 1")
        require(self.clip_eps > 0, "clip_eps", self.clip_eps, "> 0")
        require(self.kl_coef >= 0, "kl_coef", self.kl_coef, ">= 0")


def split_prompts(examples: list[PromptExample], heldout: float, seed: int
                  ) -> tuple[list[PromptExample], list[PromptExample]]:
    """(train, held-out): a seeded shuffle, `heldout` of them (at least one when > 0) kept for evaluation."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(len(examples) - 1, max(1, round(heldout * len(examples)))) if heldout > 0 else 0
    return [examples[i] for i in order[k:]], [examples[i] for i in order[:k]]


def reasoning_prompts(problems: list[Problem], tag: str = "reasoning") -> list[PromptExample]:
    """Reasoning-family problems as prompts whose reference is the final answer."""
    return [PromptExample(p.messages(with_solution=False), p.answer, {"prompt": p.prompt, "answer": p.answer},
                          f"{tag}:{i}") for i, p in enumerate(problems)]


def thinking_stats(tokenizer: Tokenizer, examples: list[PromptExample], texts: list[str]) -> dict[str, Tensor]:
    """Per completion: `correct` (the think verifier: the answer after </think> is the reference) and
    `think_tokens` (tokens of the text inside <think>...</think>, the chain of thought's length)."""
    return {"correct": torch.tensor([think_reward(t, ex.answer) for ex, t in zip(examples, texts)]),
            "think_tokens": torch.tensor([float(len(tokenizer.encode(split_reasoning(t)[0] or ""))) for t in texts])}


class PromptSource:
    """The prompts of rollout `index`: from the prompt files (shuffled passes, each pass seeded by its number,
    so a resumed run draws what it would have), else fresh task-suite prompts (even seeds: the train half)."""

    def __init__(self, cfg: PolicyOptimizationConfig, scorer: Scorer) -> None:
        self.cfg = cfg
        if cfg.prompts:
            examples = [ex for path in cfg.prompts for ex in read_prompts(path, cfg.format)]
            if not examples:
                raise LmforgeError(f"prompts: no prompt in {', '.join(cfg.prompts)}")
            scorer.check(examples)
            self.train, self.heldout = split_prompts(examples, cfg.heldout, cfg.seed)
        elif cfg.task == "reasoning":
            self.train = []
            self.heldout = reasoning_prompts(make_problems(cfg.rollout.eval_prompts, seed=2 * cfg.seed + 1),
                                             "heldout")
        else:
            self.train = []
            self.heldout = task_prompts(make_examples(cfg.rollout.eval_prompts, seed=2 * cfg.seed + 1,
                                                      kinds=cfg.rollout.kinds), "heldout")

    def __call__(self, index: int) -> list[PromptExample]:
        k, cfg = self.cfg.rollout.prompts_per_rollout, self.cfg
        if not self.train and cfg.task == "reasoning":  # even seeds: the train half of the prompt space
            return reasoning_prompts(make_problems(k, seed=2 * (cfg.seed * 1_000_003 + index)))
        if not self.train:
            return task_prompts(make_examples(k, seed=2 * (cfg.seed * 1_000_003 + index), kinds=cfg.rollout.kinds))
        n, out = len(self.train), []
        for position in range(index * k, (index + 1) * k):
            epoch, i = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
            out.append(self.train[int(order[i])])
        return out


def sample_rollout(policy: nn.Module, tokenizer: Tokenizer, params: SamplingParams, examples: list[PromptExample],
                   n: int, scorer: Callable[[list[PromptExample], list[str]], Tensor], seeds: list[int]
                   ) -> tuple[dict[str, Tensor], list[str]]:
    """n completions per example (each example's from its own generator, seeded by `seeds`), packed: input_ids,
    labels, mask, old_logps (at the sampling temperature), rewards (per sequence)."""
    prompts = chat_prompt_ids(tokenizer, [ex.messages for ex in examples])
    tokens, texts = sample_completions(policy, tokenizer, prompts, params, n, seeds=seeds)
    repeated = [p for p in prompts for _ in range(n)]
    ids, labels = pack_sequences(repeated, tokens, pad_id_of(tokenizer))
    rewards = scorer([ex for ex in examples for _ in range(n)], texts).float()
    return {"input_ids": ids, "labels": labels, "mask": (labels != IGNORE_INDEX).float(),
            "old_logps": model_token_logps(policy, ids, labels, params.temperature), "rewards": rewards}, texts


def rollout_seed(seed: int, index: int, position: int) -> int:
    """Sampling seed of the prompt at `position` in rollout `index` (its place among all the rollout's prompts): a
    prompt's completions do not depend on which data-parallel rank samples them, nor on how many ranks there are."""
    return (seed * 1_000_003 + index) * 1_000_003 + position


class RLStage(Stage):
    """A `Stage` set up for on-policy RL: on construction it loads the reference (when asked for), the
    scorer and the prompts, opens RUN, measures the held-out reward, then applies PEFT."""

    cfg: PolicyOptimizationConfig

    def __init__(self, name: str, cfg: PolicyOptimizationConfig, with_reference: bool = True, samples: int = 1
                 ) -> None:
        super().__init__(name, cfg)
        try:
            self._setup(cfg, with_reference, samples)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: PolicyOptimizationConfig, with_reference: bool, samples: int) -> None:
        k, world = cfg.rollout.prompts_per_rollout, self.dp_size
        if k % world:
            raise ConfigError(f"rollout.prompts_per_rollout must be a multiple of the {world} data-parallel processes "
                              f"(each samples whole groups for its own prompts; a group is never split), got {k}")
        if cfg.minibatches > k // world * samples:
            raise ConfigError(f"minibatches must be at most {k // world * samples} (each minibatch of the "
                              f"{k * samples} completions of a rollout gives each of the {world} processes one), "
                              f"got {cfg.minibatches}")
        self.ref = self.reference(cfg.ref_checkpoint) if with_reference else None
        self.scorer = Scorer(cfg, self.tokenizer, self.device)
        self.prompts = PromptSource(cfg, self.scorer)
        self.heldout = self.prompts.heldout
        self.open()
        self.before = self.evaluate() if self.heldout else {}
        self.add_peft()

    def evaluate(self) -> dict[str, float]:
        """Greedy completions of the held-out prompts: their mean reward, and their exact match when every
        prompt has a reference answer."""
        texts = greedy_completions(self.policy, self.tokenizer, [ex.messages for ex in self.heldout],
                                   self.cfg.sampling.max_new_tokens)
        out = {"heldout_reward": self.scorer(self.heldout, texts).mean().item()}
        if self.cfg.task == "reasoning":
            stats = thinking_stats(self.tokenizer, self.heldout, texts)
            return {**out, "heldout_accuracy": stats["correct"].mean().item(),
                    "heldout_think_tokens": stats["think_tokens"].mean().item()}
        if all(ex.answer for ex in self.heldout):
            out["heldout_exact_match"] = sum(exact_reward(t, ex.answer) for ex, t in zip(self.heldout, texts)
                                             ) / len(texts)
        return out

    def rollout(self, index: int, samples: int) -> dict[str, Tensor]:
        """This rank's share of rollout `index`: `samples` completions of each of its prompts, scored (see
        `sample_rollout`). Under torchrun each data-parallel rank samples its own equal share of the prompts (whole
        groups); each prompt's completions are seeded by its place in the rollout (`rollout_seed`), so the shares
        put together (`gather_rollout`) are the rollout one process samples. On the reasoning task also each
        completion's `correct` and `think_tokens` (`thinking_stats`)."""
        prompts = self.prompts(index)
        share = len(prompts) // self.dp_size
        first = self.dp_rank * share
        mine = prompts[first:first + share]
        seeds = [rollout_seed(self.cfg.seed, index, first + i) for i in range(share)]
        batch, texts = sample_rollout(self.policy, self.tokenizer, self.cfg.sampling, mine, samples, self.scorer,
                                      seeds=seeds)
        if self.cfg.task == "reasoning":
            batch.update(thinking_stats(self.tokenizer, [ex for ex in mine for _ in range(samples)], texts))
        return batch

    def gather_rollout(self, batch: Rollout) -> Rollout:
        """Collective: every rank's share of a rollout put together in rank order (the order of the rollout's
        prompts), on every rank, sequences right-padded to the longest: the rollout one process would hold, which
        `optimize` then cuts into the same global minibatches. The share itself in one process."""
        if self.run is None or self.dp_size == 1:
            return batch
        group, device = self.run.dp_group, self.run.device
        width = torch.tensor([max((v.shape[1] for v in batch.values() if v.dim() == 2), default=0)], device=device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
        out = {}
        for key in sorted(batch):  # the same order on every rank
            v = batch[key]
            if v.dim() == 2:
                fill = self.pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
                v = F.pad(v, (0, int(width.item()) - v.shape[1]), value=fill)
            v = v.to(device)
            parts = [torch.empty_like(v) for _ in range(self.dp_size)]
            dist.all_gather(parts, v, group=group)
            out[key] = torch.cat(parts).cpu()
        return out

    def optimize(self, model: nn.Module, loss_fn: LossFn, make_rollout: Callable[[int], Rollout], samples: int,
                 extra: Callable[[], dict[str, Any]] | None = None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, Any]:
        """Rollouts as resumable minibatches through `train_loop`, then the policy saved.

        `model` is what trains (the policy, or `wrap(policy)`: the policy with a value head); `extra()` adds result
        fields. `make_rollout` runs with the parameters gathered and returns the whole rollout (`gather_rollout`):
        every rank cuts the same global minibatches and trains on its slice of each (`RolloutBatches.rank_slice`),
        so N processes repeat one."""
        cfg = self.cfg
        print(f"{self.name}: {cfg.rollout.prompts_per_rollout} prompts x {samples} samples per rollout, "
              f"{cfg.epochs} epochs x {cfg.minibatches} minibatches, kl_coef {cfg.kl_coef}; held-out before "
              f"{self.before}", file=sys.stderr)

        def gathered_rollout(index: int) -> Rollout:
            with self.gathered(model):
                return make_rollout(index)

        batches = RolloutBatches(gathered_rollout, cfg.epochs, cfg.minibatches, seed=cfg.seed)
        result = self.fit(model, loss_fn, batches, (lambda m: self.evaluate()) if self.heldout else None,
                          wrap=wrap)
        model_dir = self.save()
        out = summary(result, model_dir, **before_after(self.before, result), **(extra() if extra else {}),
                      rollouts=batches.index)
        after = {k: out[k] for k in self.before}
        print(f"{self.name}: held-out {self.before} -> {after} -> {model_dir}")
        return out
