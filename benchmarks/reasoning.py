"""Reasoning on held-out problems, two seeds: SFT on the <think> task family (greedy accuracy before/after), the
PRM's step accuracy against the true step labels, and test-time search at equal budgets (greedy, majority vote,
PRM-guided beam search, MCTS) with standard errors: issue 18's "Measured".

Each seed runs the quickstart's reasoning stage (`lmforge.quickstart.run_reasoning_stage`: SFT of a chat model on
solved problems, a Math-Shepherd PRM from its rollouts, search on held-out problems) with that seed for the SFT
order, the PRM's rollouts and the search problems and sampling. The base model is scored greedily on the same
held-out problems first. The peer column of a search row is majority vote at the nearest token budget; the gap
is given in paired standard errors (same problems: the standard error of the mean per-problem difference of the
0/1 outcomes). `--min-steps/--max-steps` pick a harder range of the family; tune on `--seeds` other than the
reported ones (each seed draws its own held-out problems).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reasoning.py --checkpoint runs/quickstart/sft/model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import machine_line, report, script_command

from lmforge.posttrain.models import load_policy
from lmforge.posttrain.search import paired_gap, search_curve
from lmforge.quickstart import ReasoningStageConfig, run_reasoning_stage


def base_accuracy(checkpoint: str, stage: ReasoningStageConfig) -> dict[str, float]:
    """Greedy accuracy of the model before the reasoning SFT, on the stage's held-out problems."""
    policy, tokenizer = load_policy(checkpoint)
    greedy = dataclasses.replace(stage.search, methods=["greedy"], scales=[1], prm="")
    result, _ = search_curve(greedy, policy, tokenizer)
    return result["test_time_curve"][0]


def one_seed(checkpoint: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    stage = ReasoningStageConfig(problems=args.problems, min_steps=args.min_steps, max_steps=args.max_steps)
    stage.sft.seed = seed
    stage.sft.train.steps = args.sft_steps
    stage.prm = dataclasses.replace(stage.prm, seed=seed, problems=args.prm_problems, balance=not args.unbalanced,
                                    max_new_tokens=args.max_new_tokens, heldout_problems=args.prm_heldout)
    stage.prm.train.steps = args.prm_steps
    stage.search = dataclasses.replace(stage.search, seed=seed, problems=args.eval_problems, methods=args.methods,
                                       max_new_tokens=args.max_new_tokens, scales=args.scales, n=args.n,
                                       beam_width=args.beam_width, expansions=args.expansions,
                                       simulations=args.simulations, temperature=args.temperature,
                                       min_steps=args.min_steps,
                                       max_steps=args.max_steps)
    before = base_accuracy(checkpoint, stage)
    t0 = time.perf_counter()
    result = run_reasoning_stage(stage, out / f"seed{seed}", checkpoint)
    result["seconds"] = time.perf_counter() - t0
    result["base"] = before
    return result


def fmt(p: dict) -> str:
    return f"{p['accuracy']:.3f} +- {p['stderr']:.3f} ({p['tokens']:.0f} tok)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/quickstart/sft/model", help="a chat model (the quickstart's SFT)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--problems", type=int, default=3000, help="solved training problems for the SFT")
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--eval-problems", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=["greedy", "vote", "beam", "mcts"])
    ap.add_argument("--min-steps", type=int, default=2, help="reasoning steps of a problem: the family's range")
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48, help="token budget of a response (search and PRM)")
    ap.add_argument("--prm-problems", type=int, default=48, help="training problems whose rollouts label the PRM")
    ap.add_argument("--prm-heldout", type=int, default=24, help="held-out problems of the PRM's step accuracy")
    ap.add_argument("--prm-steps", type=int, default=60)
    ap.add_argument("--unbalanced", action="store_true", help="plain BCE for the PRM (no class weighting)")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 2], help="budget multipliers of the search")
    ap.add_argument("--n", type=int, default=4, help="vote samples at scale 1")
    ap.add_argument("--beam-width", type=int, default=2)
    ap.add_argument("--expansions", type=int, default=2, help="beam / MCTS next steps per node at scale 1")
    ap.add_argument("--simulations", type=int, default=8, help="MCTS simulations at scale 1")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every search but greedy")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--dump", default="", help="write every seed's stage result (JSON) here")
    args = ap.parse_args()
    if not (Path(args.checkpoint) / "tokenizer.json").is_file():
        raise SystemExit(f"{args.checkpoint}: no chat model there; run ./scripts/quickstart.sh first or pass "
                         "--checkpoint")
    rows = []
    machine = machine_line(extra=f"load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="lmforge-reasoning-") as tmp:
        results = {seed: one_seed(args.checkpoint, seed, args, Path(tmp)) for seed in args.seeds}
    if args.dump:
        Path(args.dump).write_text(json.dumps(results, indent=1))
    for seed, r in results.items():
        points = r["test_time_curve"]
        greedy = next(p for p in points if p["method"] == "greedy")
        rows.append((f"seed {seed}: held-out greedy accuracy after the reasoning SFT (peer: before)", fmt(greedy),
                     fmt(r["base"]), f"{greedy['accuracy'] - r['base']['accuracy']:+.3f}"))
        rows.append((f"seed {seed}: PRM step accuracy vs the true step labels, plain / balanced (mean of the "
                     f"per-class recalls; {r['prm_good_step_share']:.2f} of the steps good) (peer: rollout-label "
                     "agreement)", f"{r['prm_step_accuracy']:.3f} / {r['prm_balanced_step_accuracy']:.3f}",
                     f"{r['prm_label_agreement']:.3f}", "-"))
        votes = r["curve"].get("vote", [])
        for method, pts in r["curve"].items():
            if method in ("greedy", "vote"):
                continue
            for p in pts:
                peer = min(votes, key=lambda v: abs(v["tokens"] - p["tokens"])) if votes else None
                gap, se = paired_gap(p["outcomes"], peer["outcomes"]) if peer else (float("nan"), float("nan"))
                rows.append((f"seed {seed}: {method} x{p['scale']} held-out accuracy (peer: majority vote x"
                             f"{peer['scale'] if peer else '-'}, the nearest budget); gap in paired standard errors "
                             f"{gap / se if se else float('nan'):+.1f}", fmt(p), fmt(peer) if peer else "-",
                             f"{gap:+.3f}"))
        print(f"seed {seed}: stage took {r['seconds']:.0f} s", file=sys.stderr)
    limit = ("no hardware limit applies: accuracy on held-out problems (binomial standard errors; gaps in paired "
             "standard errors)")
    report(rows, machine, script_command(), limit, append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
