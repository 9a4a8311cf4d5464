"""Reasoning on held-out problems, two seeds: SFT on the <think> task family (greedy accuracy before/after), the
PRM's step accuracy against the true step labels, and test-time search at equal budgets (greedy, majority vote,
PRM-guided beam search, MCTS) with standard errors, and (`--grpo-steps`) GRPO from the SFT model with the
verifier as reward: issue 18's "Measured".

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

from lmforge.core.config import from_dict
from lmforge.posttrain.grpo import GrpoConfig, run_grpo
from lmforge.posttrain.models import load_policy
from lmforge.posttrain.search import accuracy_stats, paired_gap, search_curve
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
                                    max_new_tokens=args.max_new_tokens, heldout_problems=args.prm_heldout,
                                    labels=args.prm_labels, rollouts=args.prm_rollouts)
    stage.prm.train.steps = args.prm_steps
    stage.prm.train.lr = args.prm_lr
    stage.search = dataclasses.replace(stage.search, seed=seed, problems=args.eval_problems, methods=args.methods,
                                       max_new_tokens=args.max_new_tokens, scales=args.scales, n=args.n,
                                       beam_width=args.beam_width, expansions=args.expansions,
                                       simulations=args.simulations, temperature=args.temperature,
                                       aggregate=args.aggregate,
                                       min_steps=args.min_steps,
                                       max_steps=args.max_steps)
    before = base_accuracy(checkpoint, stage)
    t0 = time.perf_counter()
    result = run_reasoning_stage(stage, out / f"seed{seed}", checkpoint)
    result["seconds"] = time.perf_counter() - t0
    result["base"] = before
    if args.grpo_steps:
        result["grpo"] = grpo_accuracy(result["model_dir"], seed, args, out / f"seed{seed}" / "grpo")
    return result


def grpo_accuracy(checkpoint: str, seed: int, args: argparse.Namespace, run_dir: Path) -> dict:
    """GRPO from the stage's SFT model on the task family's train problems, the verifier as reward: held-out
    greedy accuracy before and after (`run_grpo`'s own held-out problems, the odd seed's half)."""
    cfg = from_dict(GrpoConfig, {
        "checkpoint": checkpoint, "run_dir": str(run_dir), "task": "reasoning", "seed": seed, "group_size": 8,
        "kl_coef": args.grpo_kl, "rollout": {"prompts_per_rollout": 8, "eval_prompts": args.eval_problems},
        "sampling": {"max_new_tokens": args.max_new_tokens},
        "train": {"steps": args.grpo_steps, "lr": args.grpo_lr, "log_every": 10, "eval_every": 0}})
    out = run_grpo(cfg)
    return {"steps": args.grpo_steps, "lr": args.grpo_lr, "kl": args.grpo_kl, "n": args.eval_problems,
            "before": out["heldout_accuracy_before"], "after": out["heldout_accuracy"]}


def fmt(p: dict) -> str:
    return f"{p['accuracy']:.3f} +- {p['stderr']:.3f} ({p['tokens']:.0f} tok)"


def vote_peer(votes: list[dict], point: dict) -> dict:
    """The majority-vote point whose mean tokens per problem are nearest `point`'s."""
    return min(votes, key=lambda v: abs(v["tokens"] - point["tokens"]))


def gap_row(label: str, point: dict, peer: dict, outcomes: tuple[list[bool], list[bool]]) -> tuple:
    gap, se = paired_gap(*outcomes)
    return (f"{label} (peer: majority vote x{peer['scale']}, the nearest budget); gap in paired standard errors "
            f"{gap / se if se else float('nan'):+.1f}", fmt(point), fmt(peer), f"{gap:+.3f}")


def seed_rows(seed: int, r: dict) -> list[tuple]:
    """One seed's rows: greedy before/after SFT, the PRM's step accuracy (when the stage trained one), GRPO
    before/after (`--grpo-steps`), each PRM search point against vote."""
    greedy = r["curve"]["greedy"][0]
    rows = [(f"seed {seed}: held-out greedy accuracy after the reasoning SFT (peer: before)", fmt(greedy),
             fmt(r["base"]), f"{greedy['accuracy'] - r['base']['accuracy']:+.3f}")]
    if "prm_step_accuracy" in r:  # the stage trained a PRM (a search method scores steps)
        rows.append((f"seed {seed}: PRM step accuracy vs the true step labels, plain / balanced (mean of the "
                     f"per-class recalls; {r['prm_good_step_share']:.2f} of the steps good) (peer: rollout-label "
                     f"agreement)", f"{r['prm_step_accuracy']:.3f} / {r['prm_balanced_step_accuracy']:.3f}",
                     f"{r['prm_label_agreement']:.3f}", "-"))
    if "grpo" in r:
        g = r["grpo"]
        se = [(p * (1 - p) / g["n"]) ** 0.5 for p in (g["after"], g["before"])]
        rows.append((f"seed {seed}: held-out greedy accuracy after GRPO ({g['steps']} steps, lr {g['lr']:g}, KL "
                     f"{g['kl']:g}, the verifier as reward, {g['n']} problems) (peer: the SFT model)",
                     f"{g['after']:.3f} +- {se[0]:.3f}", f"{g['before']:.3f} +- {se[1]:.3f}",
                     f"{g['after'] - g['before']:+.3f}"))
    votes = r["curve"].get("vote", [])
    for method, pts in r["curve"].items():
        if method in ("greedy", "vote") or not votes:
            continue
        for p in pts:
            peer = vote_peer(votes, p)
            rows.append(gap_row(f"seed {seed}: {method} x{p['scale']} held-out accuracy", p, peer,
                                (p["outcomes"], peer["outcomes"])))
    print(f"seed {seed}: stage took {r.get('seconds', float('nan')):.0f} s", file=sys.stderr)
    return rows


def pooled_rows(results: dict[int, dict]) -> list[tuple]:
    """Each PRM search point against vote over every seed's problems together (accuracy, tokens and the paired
    gap over the pooled problems), when there are several seeds."""
    if len(results) < 2:
        return []
    rows = []
    first = next(iter(results.values()))["curve"]
    for method, pts in first.items():
        if method in ("greedy", "vote") or "vote" not in first:
            continue
        for k in range(len(pts)):
            mine, peers = [], []
            for r in results.values():
                p = r["curve"][method][k]
                mine.append(p)
                peers.append(vote_peer(r["curve"]["vote"], p))
            a = [x for p in mine for x in p["outcomes"]]
            b = [x for p in peers for x in p["outcomes"]]
            pool = {"scale": mine[0]["scale"], **accuracy_stats(a, [0]),
                    "tokens": sum(p["tokens"] for p in mine) / len(mine)}
            peer = {"scale": peers[0]["scale"], **accuracy_stats(b, [0]),
                    "tokens": sum(p["tokens"] for p in peers) / len(peers)}
            rows.append(gap_row(f"seeds {'+'.join(map(str, results))} pooled ({len(a)} problems): {method} "
                                f"x{mine[0]['scale']} held-out accuracy", pool, peer, (a, b)))
    return rows


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
    ap.add_argument("--prm-lr", type=float, default=ReasoningStageConfig().prm.train.lr,
                    help="the PRM's peak learning rate (full fine-tune of the SFT model and its head)")
    ap.add_argument("--unbalanced", action="store_true", help="plain BCE for the PRM (no class weighting)")
    ap.add_argument("--prm-labels", choices=["hard", "soft"], default=ReasoningStageConfig().prm.labels,
                    help="Math-Shepherd labels: any rollout reaches the answer (hard) or the fraction that do (soft)")
    ap.add_argument("--prm-rollouts", type=int, default=ReasoningStageConfig().prm.rollouts,
                    help="continuations per step prefix that label the step")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 2], help="budget multipliers of the search")
    ap.add_argument("--n", type=int, default=4, help="vote samples at scale 1")
    ap.add_argument("--beam-width", type=int, default=2)
    ap.add_argument("--expansions", type=int, default=2, help="beam / MCTS next steps per node at scale 1")
    ap.add_argument("--simulations", type=int, default=8, help="MCTS simulations at scale 1")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every search but greedy")
    ap.add_argument("--aggregate", default="min", choices=["min", "prod", "last"],
                    help="PRM step scores -> one score")
    ap.add_argument("--grpo-steps", type=int, default=0, help="GRPO steps from each seed's SFT model (0: none)")
    ap.add_argument("--grpo-lr", type=float, default=GrpoConfig().train.lr, help="GRPO's learning rate")
    ap.add_argument("--grpo-kl", type=float, default=GrpoConfig().kl_coef, help="GRPO's KL coefficient")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--dump", default="", help="write every seed's stage result (JSON) here")
    ap.add_argument("--from-dump", nargs="+", default=[], help="build the rows from --dump files instead of running")
    args = ap.parse_args()
    if not args.from_dump and not (Path(args.checkpoint) / "tokenizer.json").is_file():
        raise SystemExit(f"{args.checkpoint}: no chat model there; run ./scripts/quickstart.sh first or pass "
                         "--checkpoint")
    if args.from_dump:
        results = {int(k): v for f in args.from_dump for k, v in json.loads(Path(f).read_text()).items()}
        machine = machine_line(extra="rows rebuilt from the runs' --dump files (see the section's prose for the runs)")
    else:
        machine = machine_line(extra=f"load average {os.getloadavg()[0]:.1f} at start")
        with tempfile.TemporaryDirectory(prefix="lmforge-reasoning-") as tmp:
            results = {seed: one_seed(args.checkpoint, seed, args, Path(tmp)) for seed in args.seeds}
        if args.dump:
            Path(args.dump).write_text(json.dumps(results, indent=1))
    rows = [row for seed, r in results.items() for row in seed_rows(seed, r)] + pooled_rows(results)
    limit = ("no hardware limit applies: accuracy on held-out problems (binomial standard errors; gaps in paired "
             "standard errors)")
    report(rows, machine, script_command(), limit, append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
