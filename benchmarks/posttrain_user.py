"""GRPO and PPO on a user prompt file with a built-in verifier: held-out reward before and after, two seeds.

The script writes the user's data itself: two-number additions ("What is 7 + 12?" -> "19"), every pair of
0..N-1 once, split at random into an SFT file (chat conversations with the answer) and a disjoint RL prompt file
(`{"prompt", "answer"}` records). A small model (the `debug` shape over a 512-token BPE trained on the package's
own text, as the tests use) is SFT'd on the first file with `run_sft` (what `lmforge sft --data` runs); then
`run_grpo` / `run_ppo` (what `lmforge grpo|ppo --prompts FILE --reward numeric` run) train it on the second file
with each seed. Each run holds out `--heldout` of the RL prompts (chosen by the run's seed, never trained on) and
scores greedy answers to them with the `numeric` verifier before and after: the figure is that mean reward, with
its standard error over the held-out prompts (binomial: the reward is 0 or 1), per seed, and the mean over
seeds with the standard error across seeds.

    python benchmarks/posttrain_user.py [--algos grpo,ppo] [--seeds 0,1] [--append]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from common import append_results, machine_line, scratch_dir, script_command, table
from tinymodels import debug_model, save_checkpoint, task_tokenizer  # tests/, on the import path through common

from lmforge.core.config import from_dict
from lmforge.posttrain.grpo import GrpoConfig, run_grpo
from lmforge.posttrain.ppo import PpoConfig, run_ppo
from lmforge.posttrain.sft import SftConfig, run_sft

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CPU = {"device": "cpu", "save_every": 0, "eval_every": 0, "log_every": 10}


def write_data(work: Path, n: int, sft_share: float) -> tuple[Path, Path, int, int]:
    """sft.jsonl (conversations) and prompts.jsonl (prompt + answer), disjoint pairs (a, b) of 0..n-1."""
    pairs = [(a, b) for a in range(n) for b in range(n)]
    random.Random(0).shuffle(pairs)
    cut = int(len(pairs) * sft_share)
    sft, rl = pairs[:cut], pairs[cut:]
    sft_path, rl_path = work / "sft.jsonl", work / "prompts.jsonl"
    sft_path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]}) + "\n"
        for a, b in sft))
    rl_path.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                               for a, b in rl))
    return sft_path, rl_path, len(sft), len(rl)


def heldout_count(total: int, fraction: float) -> int:
    """How many prompts `split_prompts` holds out (lmforge.posttrain.rl)."""
    return min(total - 1, max(1, round(fraction * total)))


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def rl_config(algo: str, args: argparse.Namespace, model: str, prompts: Path, run_dir: Path, seed: int):
    common = {"checkpoint": model, "run_dir": str(run_dir), "prompts": [str(prompts)], "reward": "numeric",
              "heldout": args.heldout, "seed": seed, "sampling": {"max_new_tokens": 6, "temperature": args.temperature},
              "rollout": {"prompts_per_rollout": 16}}
    if algo == "grpo":
        return from_dict(GrpoConfig, {**common, "group_size": 8, "kl_coef": 0.0,
                                      "train": {"steps": args.rl_steps, "lr": args.rl_lr, **CPU}})
    return from_dict(PpoConfig, {**common, "samples_per_prompt": 4, "kl_coef": 0.0,
                                 "train": {"steps": args.rl_steps, "lr": args.rl_lr, **CPU}})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", default="grpo,ppo")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--numbers", type=int, default=20, help="operands 0..N-1 (N^2 prompts in all)")
    ap.add_argument("--sft-share", type=float, default=0.5, help="share of the pairs in the SFT file")
    ap.add_argument("--heldout", type=float, default=0.3, help="share of the RL prompts held out")
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--rl-steps", type=int, default=40)
    ap.add_argument("--rl-lr", type=float, default=2e-4)
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
    with scratch_dir("lmforge-posttrain-user-") as work:
        sft_file, rl_file, n_sft, n_rl = write_data(work, args.numbers, args.sft_share)
        tok = task_tokenizer()
        base = save_checkpoint(debug_model(tok.vocab_size), tok, work / "base")
        sft = run_sft(from_dict(SftConfig, {
            "checkpoint": str(base), "run_dir": str(work / "sft"), "data": [str(sft_file)], "tasks": 0,
            "eval_tasks": 0, "val_fraction": 0.0, "max_len": 64, "batch_size": 16,
            "train": {"steps": args.sft_steps, "lr": 3e-3, **CPU}}))
        t_sft = time.time() - t0
        n_held = heldout_count(n_rl, args.heldout)
        data = (f"{n_rl} addition prompts 'What is a + b?' (a, b < {args.numbers}; {n_held} held out by each seed), "
                f"--reward numeric, T={args.temperature}, lr {args.rl_lr:g}, from the debug-shape model SFT'd "
                f"{args.sft_steps} steps on {n_sft} other pairs")
        for algo in args.algos.split(","):
            run = run_grpo if algo == "grpo" else run_ppo
            before, after = [], []
            for seed in [int(s) for s in args.seeds.split(",")]:
                out = run(rl_config(algo, args, sft["model_dir"], rl_file, work / f"{algo}-{seed}", seed))
                b, a = out["heldout_reward_before"], out["heldout_reward"]
                before.append(b)
                after.append(a)
                rows.append((f"{algo.upper()} held-out mean reward (+- binomial SE over {n_held} prompts), seed "
                             f"{seed}, after {args.rl_steps} steps (peer = the SFT model), {data}",
                             f"{a:.3f} +- {binomial_se(a, n_held):.3f}", f"{b:.3f} +- {binomial_se(b, n_held):.3f}",
                             f"{a - b:+.3f}"))
                print(f"  {algo} seed {seed}: {b:.3f} -> {a:.3f} ({time.time() - t0:.0f} s)")
            if len(after) > 1:
                se = lambda xs: statistics.stdev(xs) / math.sqrt(len(xs))  # noqa: E731
                rows.append((f"{algo.upper()} held-out mean reward, mean over {len(after)} seeds (+- SE across seeds), "
                             f"{data}", f"{statistics.mean(after):.3f} +- {se(after):.3f}",
                             f"{statistics.mean(before):.3f} +- {se(before):.3f}",
                             f"{statistics.mean(after) - statistics.mean(before):+.3f}"))
    machine, command = machine_line(extra=load), script_command()
    print(table(rows, machine, command))
    print(f"\nratio column = after - before. wall time {time.time() - t0:.0f} s (SFT {t_sft:.0f} s)")
    if args.append:
        append_results(RESULTS, rows, machine, command)
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
