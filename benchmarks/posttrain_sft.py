"""SFT's measured effect: held-out synthetic-task exact match of a small pretrained model, before vs after SFT.

The whole chain runs through the CLI, as a user would: `lmforge tokenizer train` and `data tokenize`
on real text (tinyshakespeare, or Python's English docs), `lmforge pretrain` of a ~1M-parameter
model for a few hundred steps, then `lmforge sft recipes/sft-tasks.toml` on synthetic tasks (copy,
reverse, sort, count a letter). Base and SFT model are scored on the same held-out examples
(prompts disjoint from the training ones) with greedy decoding; the peer column is the base model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/posttrain_sft.py [--rejection]

(One thread: on a 2-core machine shared with other jobs, two threads oversubscribe and run ~4x slower.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import machine_line, report
from textdata import SHAKESPEARE  # tests/, on the import path through common

from lmforge.cli import main
from lmforge.core.config import load_recipe
from lmforge.model.io import load_model
from lmforge.posttrain.sft import accuracy_by_kind
from lmforge.tasks.suite import make_examples
from lmforge.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str]) -> None:
    print("$ lmforge " + " ".join(argv), file=sys.stderr)
    if main(argv) != 0:
        raise SystemExit(f"lmforge {argv[0]} failed")


def exact_match_rows(what: str, before: dict[str, float], after: dict[str, float], ratio_digits: int
                     ) -> list[tuple[str, str, str, str]]:
    """Table rows of held-out exact match, all kinds then each kind: `after` in the lmforge column, `before` as
    the peer."""
    pairs = [("all kinds", sum(before.values()) / len(before), sum(after.values()) / len(after))]
    pairs += [(kind, before[kind], after[kind]) for kind in sorted(before)]
    return [(f"held-out exact match, {kind} ({what})", f"{a:.3f}", f"{b:.3f}",
             f"{a / b:.{ratio_digits}f}x" if b else ("inf" if a else "-")) for kind, b, a in pairs]


def main_bench() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=80)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--eval-tasks", type=int, default=240)
    ap.add_argument("--rejection", action="store_true",
                    help="then rejection-sampling fine-tuning of the SFT model (best-of-8 under the task verifier, "
                         "~2.5 epochs over the winners: more overfits them and lowers held-out accuracy)")
    ap.add_argument("--work", default="", help="working directory (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lmforge-sft-bench-"))
    start = time.perf_counter()
    run(["tokenizer", "train", "--input", str(SHAKESPEARE), "--output", str(work / "tok"), "--vocab_size", "512"])
    run(["data", "tokenize", "--input", str(SHAKESPEARE), "--tokenizer", str(work / "tok"),
         "--output", str(work / "shards"), "--val_fraction", "0.0"])
    run(["pretrain", "--data.path", str(work / "shards"), "--run_dir", str(work / "pretrain"),
         "--model.d_model", "128", "--model.n_layers", "4", "--model.n_heads", "4", "--model.max_seq_len", "128",
         "--data.seq_len", "128", "--data.batch_size", "16", "--train.steps", str(args.pretrain_steps),
         "--train.lr", "2e-3", "--train.warmup_steps", "20", "--train.precision", "fp32",
         "--train.save_every", "0", "--train.eval_every", "0"])
    t_sft = time.perf_counter()
    run(["sft", str(ROOT / "recipes" / "sft-tasks.toml"), "--checkpoint", str(work / "pretrain" / "model"),
         "--run_dir", str(work / "sft"), "--train.steps", str(args.sft_steps), "--eval_tasks", "0"])
    sft_s = time.perf_counter() - t_sft
    if args.rejection:
        kinds = ["--task_kinds", *load_recipe(ROOT / "recipes" / "sft-tasks.toml")["task_kinds"]]
        run(["rejection-sample", "--checkpoint", str(work / "sft" / "model"), "--run_dir", str(work / "rs"),
             "--tasks", "1600", "--n", "8", *kinds, "--sft.eval_tasks", "0", "--sft.max_len", "128",
             "--sft.batch_size", "8", "--sft.train.steps", "40", "--sft.train.lr", "5e-4",
             "--sft.train.precision", "fp32", "--sft.train.save_every", "0"])

    tokenizer = Tokenizer.load(work / "pretrain" / "model")
    recipe = load_recipe(ROOT / "recipes" / "sft-tasks.toml")
    held_out = make_examples(args.eval_tasks, seed=1, kinds=recipe["task_kinds"])  # train: seed 0, disjoint
    base = accuracy_by_kind(load_model(work / "pretrain" / "model"), tokenizer, held_out)
    tuned = accuracy_by_kind(load_model(work / "sft" / "model"), tokenizer, held_out)
    rs = accuracy_by_kind(load_model(work / "rs" / "sft" / "model"), tokenizer, held_out) if args.rejection else {}
    total = time.perf_counter() - start
    machine = machine_line()
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/posttrain_sft.py"
    print(f"\nSFT effect ({args.pretrain_steps} pretrain + {args.sft_steps} SFT steps; SFT {sft_s:.0f} s, "
          f"total {total:.0f} s)\n")
    limit = "quality figures: exact match 1.0 (no speed limit applies)"
    report(exact_match_rows("SFT model vs base model", base, tuned, ratio_digits=1), machine, command, limit)
    if rs:
        rows = exact_match_rows("rejection-sampling FT vs SFT model", tuned, rs, ratio_digits=2)
        report(rows, machine, f"{command} --rejection", limit)


if __name__ == "__main__":
    main_bench()
