"""`lmforge rejection-sample`: rejection-sampling fine-tuning (Touvron et al. 2023, LLaMA 2 sec. 3.2.3).

For every prompt, sample N responses from the current model, score each with a verifier (the
synthetic task's exact answer, `task_reward`) or a reward model (`lmforge reward`), keep the best
one (best-of-N) when it clears `min_reward`, write the winners as chat JSONL, then fine-tune on them
with `lmforge sft` (same loss, packing and evaluation). Best-of-N turns the model's own lucky samples
into training targets: the expected reward of the winner grows with N even when the mean does not.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Any

from lmforge.core.config import option, require
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_text
from lmforge.data.formats import Conversation, Message, read_conversations
from lmforge.generate.sampling import SamplingParams
from lmforge.posttrain.models import load_policy
from lmforge.posttrain.reward import load_reward_model, score_texts
from lmforge.posttrain.sft import ConversationSource, SftConfig, complete, run_sft, task_messages
from lmforge.posttrain.stage import RunConfig, open_run, run_dir_option
from lmforge.tasks.suite import TaskExample, task_reward
from lmforge.tokenizer import Tokenizer


@dataclass
class RejectionConfig(ConversationSource, RunConfig):
    run_dir: str = run_dir_option("runs/rejection", "config.json, samples.jsonl, winners.jsonl, and the SFT run "
                                                    "under RUN/sft")
    tasks: int = option(600, "synthetic task prompts (train split), scored by their exact answers")
    prompts: list[str] = option(default_factory=list, help="conversation files whose prompts (all but the last "
                                                           "assistant turn) are sampled; needs reward_model")
    n: int = option(8, "samples per prompt (best-of-N)")
    sampling: SamplingParams = option(default_factory=lambda: SamplingParams(max_new_tokens=16, seed=0),
                                      help="how responses are sampled")
    reward_model: str = option("", "reward model directory (`lmforge reward`); empty scores tasks by their answers")
    min_reward: float | None = option(None, "keep a winner only when its reward reaches this; default 1.0 "
                                            "(correct) under the verifier, no threshold under a reward model")
    finetune: bool = option(True, "run SFT on the winners (the sft section) after sampling")
    sft: SftConfig = option(default_factory=lambda: SftConfig(run_dir=""),
                            help="fine-tuning on the winners; its checkpoint defaults to this checkpoint, run_dir "
                                 "to RUN/sft")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.n >= 1, "n", self.n, ">= 1")


@dataclass
class Candidate:
    prompt: list[Message]
    source: str
    example: TaskExample | None = None  # set for synthetic prompts: the verifier's answer


def candidates(cfg: RejectionConfig) -> list[Candidate]:
    """Synthetic task prompts, then the prompts of the conversation files (last assistant turn dropped)."""
    out = [Candidate(task_messages(e, with_answer=False), f"task:{e.kind}:{i}", e)
           for i, e in enumerate(cfg.task_examples())]
    for path in cfg.prompts:
        for conv in read_conversations(path, cfg.format):
            out.append(Candidate(conv.messages[:-1], conv.source))
    if not out:
        raise LmforgeError("rejection-sample: no prompts (set tasks > 0 or give prompts files)")
    if cfg.prompts and not cfg.reward_model:
        raise LmforgeError("rejection-sample: prompts from files have no verifier; set reward_model to score them")
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


def run_rejection(cfg: RejectionConfig) -> dict[str, Any]:
    """Sample, score, keep best-of-N winners (RUN/winners.jsonl; every sample and reward in RUN/samples.jsonl),
    then SFT on them (RUN/sft)."""

    model, tokenizer = load_policy(cfg.checkpoint, cfg.sft.train.device)
    items = candidates(cfg)
    run_dir = open_run(cfg)
    print(f"rejection-sample: {len(items)} prompts x {cfg.n} samples", file=sys.stderr)
    responses = complete(model, tokenizer, [c.prompt for c in items], cfg.sampling, num_return_sequences=cfg.n)
    rewards = score(cfg, items, responses, tokenizer)
    threshold = cfg.min_reward if cfg.min_reward is not None else (1.0 if not cfg.reward_model else float("-inf"))
    winners = []
    for item, (index, reward) in zip(items, best_of_n(rewards, cfg.n)):
        if reward >= threshold and responses[index].strip():
            winners.append((Conversation([*item.prompt, {"role": "assistant", "content": responses[index]}],
                                         item.source), reward))
    n = cfg.n
    atomic_write_text(run_dir / "samples.jsonl", "".join(
        json.dumps({"prompt": c.prompt, "responses": responses[i * n:(i + 1) * n],
                    "rewards": rewards[i * n:(i + 1) * n], "source": c.source}) + "\n" for i, c in enumerate(items)))
    winners_path = run_dir / "winners.jsonl"
    atomic_write_text(winners_path, "".join(json.dumps({"messages": c.messages, "reward": r, "source": c.source})
                                            + "\n" for c, r in winners))
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
                                      format="chat")
        del model
        out.update({f"sft_{k}": v for k, v in run_sft(sft_cfg).items()})
    return out


def score(cfg: RejectionConfig, items: list[Candidate], responses: list[str], tokenizer: Tokenizer) -> list[float]:
    """Rewards of the samples (prompt-major, n per prompt): the reward model's, else the verifier's."""
    prompts = [c for c in items for _ in range(cfg.n)]
    if cfg.reward_model:
        rm = load_reward_model(cfg.reward_model)
        return score_texts(rm, tokenizer, [c.prompt for c in prompts], responses)
    return [task_reward(c.example, r) for c, r in zip(prompts, responses)]
