"""GRPO and PPO on a user prompt file with a built-in verifier: held-out reward before and after, two seeds.

The script writes the user's data itself: two-number additions ("What is 7 + 12?"), every pair of 0..N-1 once,
split at random into an SFT file (chat conversations with the answer) and a disjoint RL prompt file
(`{"prompt", "answer"}` records). A small model (the `debug` shape over a 512-token BPE trained on the package's
own text, as the tests use) is SFT'd on the first file with `run_sft` (what `lmforge sft --data` runs); then
`run_grpo` / `run_ppo` (what `lmforge grpo|ppo --prompts FILE --reward ...` run) train it on the second file
with each seed. Two tasks:

- `--task format` (default): the user wants replies in the sentence "The answer is N.", but only
  `--format-share` of their SFT replies use it (the rest are the bare number), so the SFT model often answers
  in the other format; each RL record carries the reply's pattern (`"regex": "^The answer is 19\\.$"`) and RL
  rewards a match with the built-in `regex` verifier (`--reward regex`): the format and the right sum. Also
  reported: the two halves apart (in the format with any sum; the right sum in any format).
- `--task addition`: the reward is the right sum (`--reward numeric`).

Each run holds out `--heldout` of the RL prompts (chosen by the run's seed, never trained on) and scores greedy
answers to them before and after: the figure is that mean reward, with its standard error over the held-out
prompts (binomial: the reward is 0 or 1), per seed, the gap in combined standard errors, and the mean over seeds
with the standard error across seeds.

    python benchmarks/posttrain_user.py [--task format|addition] [--algos grpo,ppo] [--seeds 0,1] [--append]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import time
from pathlib import Path

import torch
from common import append_results, machine_line, scratch_dir, script_command, table
from tinymodels import debug_model, save_checkpoint, task_tokenizer  # tests/, on the import path through common

from lmforge.core.config import from_dict
from lmforge.posttrain.grpo import GrpoConfig, run_grpo
from lmforge.posttrain.models import load_policy
from lmforge.posttrain.ppo import PpoConfig, run_ppo
from lmforge.posttrain.rl import split_prompts
from lmforge.posttrain.rollout import greedy_completions
from lmforge.posttrain.sft import SftConfig, run_sft
from lmforge.tasks.prompts import read_prompts
from lmforge.tasks.verifiers import numeric_reward, regex_reward

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CPU = {"device": "cpu", "save_every": 0, "eval_every": 0, "log_every": 10}


FORMAT = r"^The answer is \d+\.$"  # the format task's regex verifier: the whole reply in the sentence


def sentence(total: int) -> str:
    return f"The answer is {total}."


def write_data(work: Path, n: int, sft_share: float, format_share: float = 0.0) -> tuple[Path, Path, int, int]:
    """sft.jsonl (conversations) and prompts.jsonl (prompt + answer), disjoint pairs (a, b) of 0..n-1. With
    `format_share` > 0 that share of the SFT replies (chosen at random) is the sentence of `FORMAT`, the rest the
    bare number: a user's SFT data in mixed formats, and the format they want only in the minority; each RL prompt
    then carries the `regex` its reply must match: the sentence with the right sum."""
    pairs = [(a, b) for a in range(n) for b in range(n)]
    random.Random(0).shuffle(pairs)
    cut = int(len(pairs) * sft_share)
    sft, rl = pairs[:cut], pairs[cut:]
    pick = random.Random(1)
    replies = [sentence(a + b) if pick.random() < format_share else str(a + b) for a, b in sft]
    sft_path, rl_path = work / "sft.jsonl", work / "prompts.jsonl"
    sft_path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": reply}]}) + "\n"
        for (a, b), reply in zip(sft, replies)))
    rl_path.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b), **(
        {"regex": "^" + re.escape(sentence(a + b)) + "$"} if format_share else {})}) + "\n" for a, b in rl))
    return sft_path, rl_path, len(sft), len(rl)


def heldout_count(total: int, fraction: float) -> int:
    """How many prompts `split_prompts` holds out (lmforge.posttrain.rl)."""
    return min(total - 1, max(1, round(fraction * total)))


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def rl_config(algo: str, args: argparse.Namespace, model: str, prompts: Path, run_dir: Path, seed: int):
    reward = {"reward": "regex" if args.task == "format" else "numeric"}  # format: each record's own regex
    common = {"checkpoint": model, "run_dir": str(run_dir), "prompts": [str(prompts)], **reward,
              "heldout": args.heldout, "seed": seed,
              "sampling": {"max_new_tokens": 12 if args.task == "format" else 6, "temperature": args.temperature},
              "rollout": {"prompts_per_rollout": 16}}
    if algo == "grpo":
        return from_dict(GrpoConfig, {**common, "group_size": 8, "kl_coef": 0.0,
                                      "train": {"steps": args.rl_steps, "lr": args.rl_lr, **CPU}})
    return from_dict(PpoConfig, {**common, "samples_per_prompt": 4, "kl_coef": 0.0,
                                 "train": {"steps": args.rl_steps, "lr": args.rl_lr, **CPU}})


def gap(after: float, before: float, n: int) -> str:
    """after - before, and that gap in combined binomial standard errors."""
    se = math.hypot(binomial_se(after, n), binomial_se(before, n))
    return f"{after - before:+.3f} ({(after - before) / se:+.1f} SE)" if se else f"{after - before:+.3f}"


def heldout_parts(model_dir: str, prompts: Path, heldout: float, seed: int, max_new_tokens: int
                  ) -> tuple[float, float]:
    """Shares of a run's held-out prompts whose greedy reply is in the format (any number) and whose reply holds the
    right sum (the `numeric` verifier, any format): the two halves of the format task's reward."""
    _, held = split_prompts(read_prompts(str(prompts)), heldout, seed)
    model, tok = load_policy(model_dir, "cpu")
    texts = greedy_completions(model, tok, [ex.messages for ex in held], max_new_tokens)
    return (sum(regex_reward(t, FORMAT) for t in texts) / len(held),
            sum(numeric_reward(t, ex.answer) for t, ex in zip(texts, held)) / len(held))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("format", "addition"), default="format",
                    help="format: --reward regex (the reply is the sentence 'The answer is N.', which only "
                         "--format-share of the SFT replies use); addition: --reward numeric (the right sum)")
    ap.add_argument("--format-share", type=float, default=0.2, help="share of SFT replies in the format (task format)")
    ap.add_argument("--algos", default="grpo,ppo")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--numbers", type=int, default=20, help="operands 0..N-1 (N^2 prompts in all)")
    ap.add_argument("--sft-share", type=float, default=0.5, help="share of the pairs in the SFT file")
    ap.add_argument("--heldout", type=float, default=0.3, help="share of the RL prompts held out")
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--rl-steps", type=int, default=100)
    ap.add_argument("--rl-lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a tiny model on a loaded machine runs "
                                                           "far faster on one thread than on contended two)")
    ap.add_argument("--load", default="", help="what else loads the machine, for the machine column")
    ap.add_argument("--append", action="store_true", help=f"append the rows to {RESULTS.name}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = args.load or f"load average {Path('/proc/loadavg').read_text().split()[0]}"
    t0 = time.time()
    rows = []
    fmt = args.task == "format"
    with scratch_dir("lmforge-posttrain-user-") as work:
        sft_file, rl_file, n_sft, n_rl = write_data(work, args.numbers, args.sft_share,
                                                    args.format_share if fmt else 0.0)
        tok = task_tokenizer()
        base = save_checkpoint(debug_model(tok.vocab_size), tok, work / "base")
        sft = run_sft(from_dict(SftConfig, {
            "checkpoint": str(base), "run_dir": str(work / "sft"), "data": [str(sft_file)], "tasks": 0,
            "eval_tasks": 0, "val_fraction": 0.0, "max_len": 64, "batch_size": 16,
            "train": {"steps": args.sft_steps, "lr": 3e-3, **CPU}}))
        t_sft = time.time() - t0
        n_held = heldout_count(n_rl, args.heldout)
        reward = (f"--reward regex, each record's regex '^The answer is <sum>\\.$' ({args.format_share:.0%} of the SFT "
                  "replies in that format, the rest the bare number)" if fmt else "--reward numeric")
        data = (f"{n_rl} addition prompts 'What is a + b?' (a, b < {args.numbers}; {n_held} held out by each seed), "
                f"{reward}, T={args.temperature}, lr {args.rl_lr:g}, from the debug-shape model SFT'd "
                f"{args.sft_steps} steps on {n_sft} other pairs")
        for algo in args.algos.split(","):
            run = run_grpo if algo == "grpo" else run_ppo
            before, after = [], []
            for seed in [int(s) for s in args.seeds.split(",")]:
                cfg = rl_config(algo, args, sft["model_dir"], rl_file, work / f"{algo}-{seed}", seed)
                out = run(cfg)
                b, a = out["heldout_reward_before"], out["heldout_reward"]
                before.append(b)
                after.append(a)
                rows.append((f"{algo.upper()} held-out mean reward (+- binomial SE over {n_held} prompts), seed "
                             f"{seed}, after {args.rl_steps} steps (peer = the SFT model), {data}",
                             f"{a:.3f} +- {binomial_se(a, n_held):.3f}", f"{b:.3f} +- {binomial_se(b, n_held):.3f}",
                             gap(a, b, n_held)))
                print(f"  {algo} seed {seed}: {b:.3f} -> {a:.3f} ({time.time() - t0:.0f} s)")
                if fmt:  # the reward's two halves: the format, the right sum
                    parts = [heldout_parts(m, rl_file, args.heldout, seed, cfg.sampling.max_new_tokens)
                             for m in (out["model_dir"], sft["model_dir"])]
                    for i, what in enumerate(("in the format (any sum)", "with the right sum (any format)")):
                        a_i, b_i = parts[0][i], parts[1][i]
                        rows.append((f"{algo.upper()} held-out greedy replies {what}, seed {seed}, same run (peer = "
                                     "the SFT model)", f"{a_i:.3f} +- {binomial_se(a_i, n_held):.3f}",
                                     f"{b_i:.3f} +- {binomial_se(b_i, n_held):.3f}", gap(a_i, b_i, n_held)))
            if len(after) > 1:
                se = lambda xs: statistics.stdev(xs) / math.sqrt(len(xs))  # noqa: E731
                rows.append((f"{algo.upper()} held-out mean reward, mean over {len(after)} seeds (+- SE across seeds), "
                             f"{data}", f"{statistics.mean(after):.3f} +- {se(after):.3f}",
                             f"{statistics.mean(before):.3f} +- {se(before):.3f}",
                             f"{statistics.mean(after) - statistics.mean(before):+.3f}"))
    machine, command = machine_line(extra=load), script_command()
    print(table(rows, machine, command))
    print(f"\nratio column = after - before (in combined binomial SEs). wall time {time.time() - t0:.0f} s "
          f"(SFT {t_sft:.0f} s)")
    if args.append:
        append_results(RESULTS, rows, machine, command)
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
