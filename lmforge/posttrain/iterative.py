"""`lmforge rlhf`: LLaMA 2's iterative RLHF (Touvron et al. 2023, sec. 3.2.3) as one recipe.

Round k starts from round k-1's policy (round 1 from `--checkpoint`) and runs
  1. rejection sampling: N samples per training prompt, scored by the reward (a reward model from
     `lmforge reward`, trained with LLaMA 2's rating margin when the preference data has ratings, or any
     reward terms), the best of each N kept;
  2. fine-tuning on the winners of this round and, with `accumulate`, of every earlier round (LLaMA 2 kept
     the top samples of all iterations, so a later round cannot forget what an earlier one found);
  3. PPO from the fine-tuned policy with the same reward (`with_ppo`).
With `peft.method lora` in `rejection.sft` or `ppo`, that stage trains a fresh LoRA/DoRA adapter on the policy it
starts from, and the recipe merges it into that policy (RUN/round-K/STAGE/merged) before anything samples from it:
every stage and round starts from, and samples with, a plain full model, while training holds only adapter
gradients and optimizer state (a QLoRA base is merged back at full precision).
Before round 1 and after every round the policy answers the held-out prompts greedily; their mean reward
(and exact match, when the prompts have reference answers) goes to RUN/metrics.jsonl (one row per round, the
run report draws it) and RUN/rounds.jsonl. Prompts come from files, split once into train and held-out, or
from the synthetic task suite (train half for rounds, held-out half for evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.core.config import option, require, save_config
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json, atomic_write_text, dir_lock, writable_dir
from lmforge.peft.config import PeftConfig
from lmforge.peft.merge import merge_to_dir
from lmforge.posttrain.models import device_of, load_policy
from lmforge.posttrain.ppo import PpoConfig, run_ppo
from lmforge.posttrain.rejection import RejectionConfig, run_rejection
from lmforge.posttrain.rewards import RewardSource, Scorer, check_rewards
from lmforge.posttrain.rl import split_prompts
from lmforge.posttrain.rollout import greedy_completions
from lmforge.posttrain.sft import run_sft
from lmforge.posttrain.stage import RunConfig, run_dir_option
from lmforge.tasks.prompts import PROMPT_FORMATS, PromptExample, read_prompts, task_prompts
from lmforge.tasks.suite import make_examples
from lmforge.tasks.verifiers import exact_reward

# fields of the rejection and ppo sections that the recipe sets in every round
_OWNED = ("checkpoint", "run_dir", "resume", "prompts", "reward", "reward_model", "regex", "json_schema")


@dataclass
class IterativeRlhfConfig(RewardSource, RunConfig):
    run_dir: str = run_dir_option("runs/rlhf", "config.json, prompts/, rounds.jsonl, metrics.jsonl and one folder "
                                               "per round (rejection/, sft/, ppo/)")
    rounds: int = option(2, "rounds of rejection sampling + fine-tuning (+ PPO)")
    prompts: list[str] = option(default_factory=list, help="prompt files (the formats of `lmforge ppo --prompts`), "
                                                           "split once into train and held-out; empty = the "
                                                           "synthetic task suite")
    format: str = option("auto", "format of the prompt files")
    heldout: float = option(0.1, "fraction of the prompt files' prompts held out for the per-round evaluation")
    tasks: int = option(300, "without prompt files: synthetic train prompts sampled per round (new ones each round)")
    eval_prompts: int = option(64, "without prompt files: held-out synthetic prompts for the per-round evaluation")
    eval_max_new_tokens: int = option(16, "most tokens of each greedy held-out answer")
    accumulate: bool = option(True, "fine-tune on the winners of this and every earlier round (LLaMA 2), not only "
                                    "this round's")
    with_ppo: bool = option(True, "run PPO after the fine-tuning of each round")
    resume: bool = option(False, "continue RUN: finished rounds are kept, an unfinished one resumes its stages")
    seed: int = option(0, "seed of the prompt split; round k samples with seed + k")
    device: str = option("auto", "cpu, cuda, or auto (the held-out evaluation; stages use their train.device)")
    rejection: RejectionConfig = option(default_factory=lambda: RejectionConfig(run_dir="", tasks=0),
                                        help="rejection sampling and its fine-tuning (the sft keys) in each round")
    ppo: PpoConfig = option(default_factory=lambda: PpoConfig(run_dir="", heldout=0.0), help="PPO in each round")

    def __post_init__(self) -> None:
        check_rewards(self)
        require(self.rounds >= 1, "rounds", self.rounds, ">= 1")
        require(self.format in PROMPT_FORMATS, "format", self.format, f"one of {', '.join(PROMPT_FORMATS)}")
        require(0 < self.heldout < 1, "heldout", self.heldout, "in (0, 1)")
        require(self.tasks >= 1 or bool(self.prompts), "tasks", self.tasks, ">= 1 when no prompt files are given")
        require(self.eval_prompts >= 1, "eval_prompts", self.eval_prompts, ">= 1")
        defaults = {"rejection": RejectionConfig(run_dir="", tasks=0), "ppo": PpoConfig(run_dir="", heldout=0.0)}
        for section, default in defaults.items():
            sub = getattr(self, section)
            for name in (*_OWNED, "tasks", "heldout", "format"):
                if hasattr(sub, name) and getattr(sub, name) != getattr(default, name):
                    raise LmforgeError(f"{section}.{name}: the rlhf recipe sets it in every round; set the "
                                       f"top-level option instead (see `lmforge rlhf --help`)")
        for name in ("checkpoint", "run_dir", "data", "resume"):
            if getattr(self.rejection.sft, name):
                raise LmforgeError(f"rejection.sft.{name}: the rlhf recipe sets it in every round")
        for key, peft in (("rejection.sft.peft.method", self.rejection.sft.peft), ("ppo.peft.method", self.ppo.peft)):
            require(peft.method in ("none", "lora"), key, peft.method,
                    "none or lora: each stage's adapter is merged into the policy before the next stage samples, and "
                    "prompt, prefix and bottleneck adapters cannot be merged")


def reward_fields(cfg: IterativeRlhfConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RewardSource)}


def split(cfg: IterativeRlhfConfig) -> tuple[list[PromptExample], list[PromptExample]]:
    """(train, held-out) prompts: the prompt files split once by `seed`, else [] and the synthetic held-out half."""
    if not cfg.prompts:
        return [], task_prompts(make_examples(cfg.eval_prompts, seed=2 * cfg.seed + 1), "heldout")
    examples = [ex for path in cfg.prompts for ex in read_prompts(path, cfg.format)]
    if len(examples) < 2:
        raise LmforgeError(f"prompts: need at least 2 prompts to hold some out, got {len(examples)}")
    return split_prompts(examples, cfg.heldout, cfg.seed)


def evaluate(model_dir: str, examples: list[PromptExample], cfg: IterativeRlhfConfig, scorer: Scorer | None
             ) -> tuple[dict[str, float], Scorer]:
    """Greedy answers of the policy in `model_dir` to the held-out prompts: mean reward, and exact match when
    every prompt has a reference answer."""
    model, tokenizer = load_policy(model_dir, cfg.device)
    scorer = scorer or Scorer(cfg, tokenizer, device_of(model))
    texts = greedy_completions(model, tokenizer, [ex.messages for ex in examples], cfg.eval_max_new_tokens)
    out = {"heldout_reward": scorer(examples, texts).mean().item()}
    if all(ex.answer for ex in examples):
        out["heldout_exact_match"] = sum(exact_reward(t, ex.answer) for ex, t in zip(examples, texts)) / len(texts)
    return out, scorer


def read_rounds(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """rounds.jsonl (everything per round) and metrics.jsonl (its numbers, step = round, for the report)."""
    atomic_write_text(run_dir / "rounds.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    numbers = [{"step": r["round"], **{k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "round"}}
               for r in rows]
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in numbers))


def merged_policy(stage: dict[str, Any], start: str, peft: PeftConfig) -> str:
    """The policy a stage trained from `start`, as a full model directory: its RUN/model, or under LoRA the adapter
    in RUN/model merged into `start` (written to RUN/merged)."""
    if peft.method == "none":
        return stage["model_dir"]
    adapter = Path(stage["model_dir"])
    return str(merge_to_dir(start, adapter, adapter.parent / "merged"))


def run_round(cfg: IterativeRlhfConfig, k: int, policy: str, train_file: str, winners: list[str], run_dir: Path
              ) -> dict[str, Any]:
    """Round k from `policy`: rejection sampling, fine-tuning on the winners, PPO; returns the round's figures."""
    where = run_dir / f"round-{k}"
    prompts = [train_file] if train_file else []
    rs_cfg = dataclasses.replace(
        cfg.rejection, **reward_fields(cfg), checkpoint=policy, run_dir=str(where / "rejection"), prompts=prompts,
        format="auto", tasks=0 if train_file else cfg.tasks, task_seed=2 * (cfg.seed * 1_000 + k), finetune=False,
        sampling=dataclasses.replace(cfg.rejection.sampling, seed=(cfg.rejection.sampling.seed or 0) + k))
    rs = run_rejection(rs_cfg)
    winners.append(rs["winners_path"])
    if rs["winners"] == 0:
        raise LmforgeError(f"rlhf round {k}: no sample reached the rejection threshold; nothing to fine-tune on "
                           "(raise rejection.n or rejection.sampling.temperature, or lower rejection.min_reward)")
    sft_cfg = dataclasses.replace(cfg.rejection.sft, checkpoint=policy, run_dir=str(where / "sft"), format="chat",
                                  data=list(winners) if cfg.accumulate else [winners[-1]], resume=cfg.resume)
    sft = run_sft(sft_cfg)
    row: dict[str, Any] = {"round": k, "rs_mean_reward": rs["mean_reward"], "rs_best_of_n_reward":
                           rs["best_of_n_reward"], "winners": rs["winners"], "sft_final_loss": sft["final_loss"],
                           "model_dir": merged_policy(sft, policy, cfg.rejection.sft.peft)}
    if cfg.with_ppo:
        ppo_cfg = dataclasses.replace(cfg.ppo, **reward_fields(cfg), checkpoint=row["model_dir"],
                                      run_dir=str(where / "ppo"), prompts=prompts, resume=cfg.resume,
                                      seed=cfg.ppo.seed + k)
        ppo = run_ppo(ppo_cfg)
        row.update(ppo_final_loss=ppo["final_loss"], ppo_kl_coef=ppo.get("kl_coef"),
                   model_dir=merged_policy(ppo, row["model_dir"], cfg.ppo.peft))
    return row


def run_iterative_rlhf(cfg: IterativeRlhfConfig) -> dict[str, Any]:
    """All rounds; returns the per-round rows and the final model directory."""
    if not cfg.checkpoint:
        raise LmforgeError("rlhf: give --checkpoint DIR (the SFT policy to start from)")
    run_dir = writable_dir(cfg.run_dir, "run_dir")
    with dir_lock(run_dir):
        rows = read_rounds(run_dir / "rounds.jsonl")
        if rows and not cfg.resume:
            raise LmforgeError(f"{run_dir} already holds {len(rows) - 1} finished round(s); pass --resume true to "
                               "continue, or choose another run_dir")
        save_config(cfg, run_dir / "config.json")
        train, heldout = split(cfg)
        train_file = ""
        if train:
            train_file = str(run_dir / "prompts" / "train.jsonl")
            atomic_write_text(train_file, "".join(json.dumps(ex.record) + "\n" for ex in train))
            atomic_write_text(run_dir / "prompts" / "heldout.jsonl",
                              "".join(json.dumps(ex.record) + "\n" for ex in heldout))
        scorer = None
        if not rows:
            before, scorer = evaluate(cfg.checkpoint, heldout, cfg, scorer)
            rows = [{"round": 0, **before, "model_dir": cfg.checkpoint}]
            write_rows(run_dir, rows)
        winners = [str(run_dir / f"round-{r['round']}" / "rejection" / "winners.jsonl") for r in rows[1:]]
        print(f"rlhf: {cfg.rounds} rounds from {cfg.checkpoint}; held-out before: "
              f"{ {k: v for k, v in rows[0].items() if k.startswith('heldout')} }", file=sys.stderr)
        for k in range(len(rows), cfg.rounds + 1):
            row = run_round(cfg, k, rows[-1]["model_dir"], train_file, winners, run_dir)
            after, scorer = evaluate(row["model_dir"], heldout, cfg, scorer)
            rows.append({**row, **after})
            write_rows(run_dir, rows)
            print(f"rlhf round {k}: held-out {after} -> {row['model_dir']}", file=sys.stderr)
        result = {"rounds": cfg.rounds, "model_dir": rows[-1]["model_dir"],
                  **{f"{key}_before": rows[0][key] for key in rows[0] if key.startswith("heldout")},
                  **{key: rows[-1][key] for key in rows[0] if key.startswith("heldout")}}
        atomic_write_json(run_dir / "done.json", result)
    summary_line = ", ".join(f"{k} {result[k + '_before']:.3f} -> {result[k]:.3f}" for k in rows[0]
                             if k.startswith("heldout"))
    print(f"rlhf: {summary_line} after {cfg.rounds} rounds -> {result['model_dir']}")
    return result

