"""`lmforge rejection-sample`: rejection-sampling fine-tuning (Touvron et al. 2023, LLaMA 2 sec. 3.2.3).

For every prompt, sample N responses from the current model, score each with the configured reward
(`posttrain.rewards`: a verifier against the prompt's reference answer, a reward model from `lmforge reward`,
or the user's function), keep the best
one (best-of-N) when it clears `min_reward`, write the winners as chat JSONL, then fine-tune on them
with `lmforge sft` (same loss, packing and evaluation). Best-of-N turns the model's own lucky samples
into training targets: the expected reward of the winner grows with N even when the mean does not.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lmforge.core.config import option, require
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_text
from lmforge.data.formats import Conversation
from lmforge.generate.sampling import SamplingParams
from lmforge.parallel import DistributedRun, ParallelConfig, setup_parallel
from lmforge.posttrain.models import device_of, load_policy
from lmforge.posttrain.rewards import RewardSource, Scorer, check_rewards
from lmforge.posttrain.sft import ConversationSource, SftConfig, complete, run_sft
from lmforge.posttrain.stage import RunConfig, check_post_training_parallel, open_run, run_dir_option
from lmforge.tasks.prompts import PromptExample, read_prompts, task_prompts


@dataclass
class RejectionConfig(ConversationSource, RewardSource, RunConfig):
    run_dir: str = run_dir_option("runs/rejection", "config.json, samples.jsonl, winners.jsonl, and the SFT run "
                                                    "under RUN/sft")
    tasks: int = option(600, "synthetic task prompts (train split), scored by their exact answers")
    prompts: list[str] = option(default_factory=list, help="prompt files (any conversation format, or {prompt, "
                                                           "answer}): the prompt is all but the last assistant turn, "
                                                           "which (or 'answer') is the verifiers' reference")
    n: int = option(8, "samples per prompt (best-of-N)")
    sampling: SamplingParams = option(default_factory=lambda: SamplingParams(max_new_tokens=16, seed=0),
                                      help="how responses are sampled")
    min_reward: float | None = option(None, "keep a winner only when its reward reaches this; default: the "
                                            "full reward (every verifier passed) under built-in verifiers, no "
                                            "threshold with a reward model or a reward function")
    finetune: bool = option(True, "run SFT on the winners (the sft section) after sampling")
    parallel: ParallelConfig = option(default_factory=ParallelConfig, help="distributed sampling and fine-tuning "
                                      "under torchrun (ddp/fsdp); also the sft section's parallel settings")
    sft: SftConfig = option(default_factory=lambda: SftConfig(run_dir=""),
                            help="fine-tuning on the winners; its checkpoint defaults to this checkpoint, run_dir "
                                 "to RUN/sft")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rewards(self)
        require(self.n >= 1, "n", self.n, ">= 1")


def candidates(cfg: RejectionConfig) -> list[PromptExample]:
    """Synthetic task prompts, then the prompts of the prompt files."""
    out = task_prompts(cfg.task_examples())
    for path in cfg.prompts:
        out += read_prompts(path, cfg.format)
    if not out:
        raise LmforgeError("rejection-sample: no prompts (set tasks > 0 or give prompts files)")
    return out


def best_of_n(rewards: list[float], n: int) -> list[tuple[int, float]]:
    """(index of the best sample, its reward) for each group of n consecutive rewards; ties go to the first."""
    if len(rewards) % n:
        raise ValueError(f"{len(rewards)} rewards are not groups of {n}")
    out = []
    for g in range(0, len(rewards), n):
        group = rewards[g:g + n]
        best = max(range(n), key=lambda i: (group[i], -i))
        out.append((g + best, group[best]))
    return out


SAMPLE_CHUNK = 64  # prompts sampled together, each chunk seeded by its position (as `complete` does)


def sample_and_score(model: Any, tokenizer: Any, items: list[PromptExample], cfg: RejectionConfig, scorer: Scorer,
                     rank: int = 0, world: int = 1) -> tuple[list[str], list[float]]:
    """n responses per prompt and their rewards (prompt-major). Prompts go in chunks of SAMPLE_CHUNK, chunk c
    seeded with sampling.seed + its first prompt's index; under torchrun rank r samples chunks r, r + world, ...
    and the ranks exchange results, so every rank ends with what one process samples alone."""
    mine: dict[int, tuple[list[str], list[float]]] = {}
    for c in range(rank, -(-len(items) // SAMPLE_CHUNK), world):
        chunk = items[c * SAMPLE_CHUNK:(c + 1) * SAMPLE_CHUNK]
        params = cfg.sampling
        if params.seed is not None:
            params = dataclasses.replace(params, seed=params.seed + c * SAMPLE_CHUNK)
        texts = complete(model, tokenizer, [x.messages for x in chunk], params, num_return_sequences=cfg.n,
                         batch_size=SAMPLE_CHUNK)
        mine[c] = texts, scorer([x for x in chunk for _ in range(cfg.n)], texts).tolist()
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {c: v for part in parts for c, v in part.items()}
    responses = [t for c in sorted(mine) for t in mine[c][0]]
    rewards = [r for c in sorted(mine) for r in mine[c][1]]
    return responses, rewards


def run_rejection(cfg: RejectionConfig) -> dict[str, Any]:
    """Sample, score, keep best-of-N winners (RUN/winners.jsonl; every sample and reward in RUN/samples.jsonl),
    then SFT on them (RUN/sft). Under torchrun the ranks share the sampling and the fine-tuning (`parallel`)."""
    check_post_training_parallel(cfg.parallel)
    run = setup_parallel(cfg.parallel, cfg.sft.train.device, log_dir=Path(cfg.run_dir) / "logs")
    try:
        return _run_rejection(cfg, run)
    finally:
        if run is not None:
            run.close()


def _run_rejection(cfg: RejectionConfig, run: DistributedRun | None) -> dict[str, Any]:
    main = run is None or run.is_main
    model, tokenizer = load_policy(cfg.checkpoint, cfg.sft.train.device if run is None else str(run.device))
    items = candidates(cfg)
    scorer = Scorer(cfg, tokenizer, device_of(model))
    scorer.check(items)
    run_dir = open_run(cfg) if main else Path(cfg.run_dir)
    print(f"rejection-sample: {len(items)} prompts x {cfg.n} samples", file=sys.stderr)
    responses, rewards = sample_and_score(model, tokenizer, items, cfg, scorer,
                                          *((run.dp_rank, run.dp_size) if run is not None else (0, 1)))
    threshold = cfg.min_reward if cfg.min_reward is not None else (
        scorer.max_verifier_reward() if scorer.is_verifier else float("-inf"))
    winners = []
    for item, (index, reward) in zip(items, best_of_n(rewards, cfg.n)):
        if reward >= threshold and responses[index].strip():
            winners.append((Conversation([*item.messages, {"role": "assistant", "content": responses[index]}],
                                         item.source), reward))
    n = cfg.n
    winners_path = run_dir / "winners.jsonl"
    if main:
        atomic_write_text(run_dir / "samples.jsonl", "".join(
            json.dumps({"prompt": c.messages, "responses": responses[i * n:(i + 1) * n],
                        "rewards": rewards[i * n:(i + 1) * n], "source": c.source}) + "\n"
            for i, c in enumerate(items)))
        atomic_write_text(winners_path, "".join(json.dumps({"messages": c.messages, "reward": r, "source": c.source})
                                                + "\n" for c, r in winners))
    if run is not None:
        dist.barrier()  # the SFT phase reads winners.jsonl on every rank
    mean = sum(rewards) / len(rewards)
    best = sum(r for _, r in best_of_n(rewards, cfg.n)) / len(items)
    out: dict[str, Any] = {"prompts": len(items), "samples": len(rewards), "mean_reward": mean,
                           "best_of_n_reward": best, "winners": len(winners), "winners_path": str(winners_path)}
    print(f"rejection-sample: mean reward {mean:.4f}, best-of-{cfg.n} reward {best:.4f}; kept {len(winners)} "
          f"winners -> {winners_path}")
    if cfg.finetune:
        if not winners:
            raise LmforgeError(f"rejection-sample: no sample reached min_reward {threshold}; nothing to fine-tune "
                               "on (raise n or sampling.temperature, or lower min_reward)")
        sft_cfg = dataclasses.replace(cfg.sft, checkpoint=cfg.sft.checkpoint or cfg.checkpoint,
                                      run_dir=cfg.sft.run_dir or str(run_dir / "sft"), data=[str(winners_path)],
                                      format="chat", parallel=cfg.parallel)
        del model
        out.update({f"sft_{k}": v for k, v in run_sft(sft_cfg).items()})
    return out

