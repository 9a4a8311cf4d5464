"""Data-parallel scaling on this CPU: 2-process DDP / FSDP2 (gloo) vs 1 process, same global batch; and the
memory activation checkpointing saves.

Throughput comes from full `lmforge pretrain` runs (the launcher, the loader's per-rank slices, all-reduces
and checkpoints-off training steps): tokens/s over the steps after the first logging window. Honest for 2
cores: 2 processes x 1 thread use the same cores as 1 process x 2 threads, so the fair peer is the latter;
scaling efficiency against 1 process x 1 thread (tokens/s of 2 / (2 x tokens/s of 1)) shows what
communication costs. Data: random token ids (throughput does not depend on content).

Expert parallelism: an MoE model (8 experts top-2 in every block) trained by 2 processes with its experts
split over them (--parallel.expert 2, all-to-all dispatch) vs the same run in 1 process; these rows are also
appended to benchmarks/RESULTS.md (`--only ep` runs just them).

Activation checkpointing: bytes saved for backward (`saved_tensors_hooks`, exact) and the peak RSS
of a fresh process per mode running 3 training steps, and the step time it costs.

Pipeline parallelism (`--pipeline`, appended to RESULTS.md): 2-stage 1F1B `lmforge pretrain` runs vs 1 process
(tokens/s), and the bubble: each stage times its own forward/backward work inside the library's schedule
(`PipelineRunner.measure_busy_time`); 1 - busy / step time, averaged over the stages, against the schedule's
theoretical (P-1)/(M+P-1) (interleaved: (P-1)/(V*M+P-1)). The measured figure also holds point-to-point
transfer and, on a shared CPU, time the other processes took from this one.

Planner vs measured memory (`--plan`, appended to RESULTS.md): a ~40M-parameter fp32 model trained a few steps
by `lmforge pretrain` in 1 process, DDP 2, FSDP 2, PP 2 and TP 2 (each rank run through this script's
`--child-plan` wrapper under torchrun); each rank's peak RSS during training (VmHWM at the end of each step,
before the final checkpoint; glibc's mmap threshold pinned so freed tensors leave RSS) minus its RSS before
`pretrain` started (everything imported), against what
`lmforge.parallel.plan` predicts for the same model and layout with `precision="fp32"`. Not modelled by the
planner: the allocator's slack, gloo's buffers, DDP's gradient buckets, FSDP's gathered blocks, PP's
full-model build before the split.

    python benchmarks/distributed.py
    python benchmarks/distributed.py --plan
    python benchmarks/distributed.py --pipeline --steps 12
    python benchmarks/distributed.py --only ep --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import append_results, machine_line, script_command, table

from lmforge.cli import main as lmforge_main
from lmforge.core.config import from_dict
from lmforge.data.shards import ShardWriter
from lmforge.model import ModelConfig, Transformer
from lmforge.model.size import num_params
from lmforge.parallel import ParallelConfig
from lmforge.parallel.checkpointing import apply_activation_checkpointing
from lmforge.parallel.launch import free_port
from lmforge.parallel.pipeline import PipelineRunner, split_model, theoretical_bubble
from lmforge.parallel.plan import Layout, PlanConfig, evaluate
from lmforge.train import pretrain as pretrain_module
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import build_optimizer
from lmforge.train.pretrain import lm_loss

VOCAB = 512
MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "vocab_size": VOCAB, "max_seq_len": 128}
MOE_MODEL = {**MODEL, "moe_experts": 8, "moe_top_k": 2, "moe_d_ff": 128}
AC_MODEL = {"d_model": 256, "n_layers": 6, "n_heads": 8, "vocab_size": VOCAB, "max_seq_len": 256}
AC_BATCH = 8
COMMAND = "python benchmarks/distributed.py"
PLAN_MODEL = {"d_model": 640, "n_layers": 8, "n_heads": 8, "n_kv_heads": 8, "d_ff": 1792, "vocab_size": VOCAB,
              "max_seq_len": 64}  # ~41M parameters
PLAN_BATCH, PLAN_STEPS = 8, 4
# name, `lmforge pretrain` flags, the planner's layout (micro_batch = the sequences one forward holds)
PLAN_LAYOUTS = [
    ("1 process", [], Layout(micro_batch=PLAN_BATCH)),
    ("DDP 2", ["--parallel.data", "ddp"], Layout(dp=2, zero=0, micro_batch=PLAN_BATCH // 2)),
    ("FSDP 2", ["--parallel.data", "fsdp"], Layout(dp=2, zero=3, micro_batch=PLAN_BATCH // 2)),
    ("PP 2 (1F1B, 4 micro-batches)", ["--parallel.pipeline", "2", "--parallel.microbatches", "4"],
     Layout(pp=2, micro_batch=PLAN_BATCH // 4)),
    ("TP 2", ["--parallel.tensor", "2"], Layout(tp=2, micro_batch=PLAN_BATCH)),
]


def write_random_shards(directory: Path, n_tokens: int = 300_000) -> None:
    rng = np.random.default_rng(0)
    with ShardWriter(directory / "train", VOCAB) as w:
        for doc in np.array_split(rng.integers(0, VOCAB, n_tokens), 100):
            w.add(doc, n_bytes=len(doc))


def pretrain_tokens_per_s(root: Path, name: str, threads: int, steps: int, *args: str,
                          model: dict | None = None) -> float:
    recipe = {"data": {"path": str(root / "shards"), "seq_len": 128, "batch_size": 16},
              "model": model or MODEL,
              "train": {"steps": steps, "lr": 1e-3, "precision": "fp32", "device": "cpu", "log_every": steps // 3,
                        "eval_every": 0, "save_every": 0, "plot_every": 0}}
    (root / "recipe.json").write_text(json.dumps(recipe))
    run = root / name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", str(root / "recipe.json"), "--run_dir",
                          str(run), *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "tokens_per_s" in r]
    return float(np.mean([r["tokens_per_s"] for r in rows[1:]]))  # skip the first window (warm-up)


def saved_activation_bytes(mode: str) -> tuple[int, float]:
    """Bytes autograd keeps for backward in one training step, and the step's seconds (median of 3)."""
    torch.manual_seed(0)
    model = Transformer(from_dict(ModelConfig, AC_MODEL))
    apply_activation_checkpointing(model, mode, every=2)
    x = torch.randint(0, VOCAB, (AC_BATCH, AC_MODEL["max_seq_len"] + 1))
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    times = []
    for i in range(4):
        total = 0
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = lm_loss(model, (x[:, :-1], x[:, 1:]))
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return total, float(np.median(times))


def child_peak_rss(mode: str) -> None:
    """In a fresh process: peak RSS (MiB) of 3 AdamW steps; model, gradients and optimizer state are the same
    in every mode, so the difference between modes is activation memory."""
    torch.manual_seed(0)
    model = Transformer(from_dict(ModelConfig, AC_MODEL))
    apply_activation_checkpointing(model, mode, every=2)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4))
    x = torch.randint(0, VOCAB, (AC_BATCH, AC_MODEL["max_seq_len"] + 1))
    for p in model.parameters():  # allocate gradients and optimizer state first, so only activations differ
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for _ in range(3):
        loss, _ = lm_loss(model, (x[:, :-1], x[:, 1:]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def peak_rss_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--child-ac", mode], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


class RandomBatches:
    """Random (inputs, targets) batches of `batch` x 128 tokens (throughput does not depend on content)."""

    def __init__(self, batch: int) -> None:
        self.batch, self.g = batch, torch.Generator().manual_seed(0)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, VOCAB, (self.batch, MODEL["max_seq_len"] + 1), generator=self.g)
        return x[:, :-1], x[:, 1:]


def _bubble_worker(rank: int, world: int, port: int, schedule: str, microbatches: int, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = ParallelConfig(pipeline=world, pipeline_schedule=schedule, microbatches=microbatches)
        torch.manual_seed(0)
        model = Transformer(from_dict(ModelConfig, MODEL))
        n_stages = world * cfg.stages_per_rank
        stage_ids = [rank + v * world for v in range(cfg.stages_per_rank)]
        local, chunks = split_model(model, n_stages, stage_ids)
        runner = PipelineRunner(cfg, local, chunks, stage_ids, n_stages, torch.device("cpu"), dist.group.WORLD)
        runner.measure_busy_time()
        batches = RandomBatches(16)
        wall = 0.0
        for step in range(steps + 2):  # 2 warm-up steps
            if step == 2:
                runner.busy_s, wall = 0.0, 0.0
            dist.barrier()
            t0 = time.perf_counter()
            runner.forward_backward(lm_loss, batches, 1, "fp32", lambda b: b[0].numel())
            local.zero_grad(set_to_none=True)
            wall += time.perf_counter() - t0
        fractions = [None] * world
        dist.all_gather_object(fractions, 1 - runner.busy_s / wall)
        if rank == 0:
            queue.put((float(np.mean(fractions)), 16 * MODEL["max_seq_len"] * steps / wall))
    finally:
        dist.destroy_process_group()


def measured_bubble(schedule: str, microbatches: int, steps: int) -> tuple[float, float]:
    """(bubble fraction averaged over the 2 stages, tokens/s) of `steps` pipeline steps, batch 16 x 128."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    here = str(Path(__file__).resolve().parent)  # the workers re-run this script, which imports `common` (and
    sys.path.insert(0, here)                       # `common` takes this folder off sys.path again)
    try:
        mp.start_processes(_bubble_worker, args=(2, free_port(), schedule, microbatches, steps, queue), nprocs=2,
                           start_method="spawn")
    finally:
        sys.path.remove(here)
    return queue.get(timeout=60)


def pipeline_rows(steps: int, results: Path) -> None:
    """PP rows: tokens/s of 2-stage pretraining vs 1 process, and measured vs theoretical bubble."""
    machine = machine_line(parallel=f"2 processes x 1 thread, {os.cpu_count()} cores, load "
                                    f"{os.getloadavg()[0]:.0f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_random_shards(root / "shards")
        one = pretrain_tokens_per_s(root, "one-1t", 1, steps)
        pp = pretrain_tokens_per_s(root, "pp", 1, steps, "--nproc", "2", "--parallel.pipeline", "2",
                                   "--parallel.microbatches", "8")
    rows.append(("tokens/s, pretrain PP=2 1F1B (8 micro-batches) 2 proc x 1 thread vs 1 proc x 1 thread",
                 fmt(pp), fmt(one), f"{pp / one:.2f}"))
    for schedule, m in [("gpipe", 2), ("1f1b", 2), ("1f1b", 8), ("interleaved-1f1b", 8)]:
        bubble, _ = measured_bubble(schedule, m, steps)
        theory = theoretical_bubble(2, m, 2 if schedule.startswith("interleaved") else 1)
        rows.append((f"pipeline bubble, PP=2 {schedule}, {m} micro-batches: measured vs theoretical",
                     f"{bubble:.0%}", f"{theory:.0%}", f"{bubble / theory:.2f}"))
    print(table(rows, machine, script_command()))
    append_results(results, rows, machine, script_command())
def expert_rows(root: Path, steps: int) -> list[tuple[str, float | str, float | str, float]]:
    """EP=2 on 2 processes x 1 thread vs the MoE model in 1 process (1 and 2 threads)."""
    one_1 = pretrain_tokens_per_s(root, "moe-one-1t", 1, steps, model=MOE_MODEL)
    one_2 = pretrain_tokens_per_s(root, "moe-one-2t", 2, steps, model=MOE_MODEL)
    ep = pretrain_tokens_per_s(root, "moe-ep2", 1, steps, "--nproc", "2", "--parallel.data", "ddp",
                               "--parallel.expert", "2", model=MOE_MODEL)
    return [("tokens/s, MoE 8 experts: EP=2 (2 proc x 1 thread) vs 1 proc x 1 thread", ep, one_1, ep / one_1),
            ("tokens/s, MoE 8 experts: EP=2 (2 proc x 1 thread) vs 1 proc x 2 threads", ep, one_2, ep / one_2)]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {field} (the --plan rows need Linux)")


def child_plan(out: str, argv: list[str]) -> int:
    """One training process (a torchrun worker, or the only process): its RSS before `lmforge pretrain` starts
    (lmforge and torch already imported), then `pretrain` with a step-end hook that reads the peak RSS (VmHWM)
    after every optimizer step, so the final checkpoint and model save are not counted."""
    peak = {"kib": 0}
    original = pretrain_module.train_loop

    def record(model: torch.nn.Module, step: int) -> dict[str, float]:
        peak["kib"] = _status_kib("VmHWM")
        return {}

    def loop(*args, on_step_end=None, **kwargs):
        return original(*args, on_step_end=[*(on_step_end or []), record], **kwargs)
    pretrain_module.train_loop = loop
    baseline = _status_kib("VmRSS")
    rc = lmforge_main(argv)
    rank = os.environ.get("RANK", "0")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"baseline_kib": baseline, "peak_kib": peak["kib"]}))
    return rc


def measured_peaks(root: Path, name: str, flags: list[str]) -> tuple[list[float], ModelConfig]:
    """Per-rank peak training memory (MiB) of a short `lmforge pretrain` of PLAN_MODEL in fp32, and the model
    config the run resolved (RUN/config.json: pretrain's defaults fill what PLAN_MODEL leaves out)."""
    recipe = {"data": {"path": str(root / "shards"), "seq_len": PLAN_MODEL["max_seq_len"],
                       "batch_size": PLAN_BATCH},
              "model": PLAN_MODEL,
              "train": {"steps": PLAN_STEPS, "lr": 1e-4, "precision": "fp32", "device": "cpu", "log_every": 1,
                        "eval_every": 0, "save_every": 0, "plot_every": 0}}
    (root / "plan.json").write_text(json.dumps(recipe))
    out = root / f"peaks-{len(list(root.glob('peaks-*')))}"
    out.mkdir()
    nproc = 2 if flags else 1
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if flags else []
    run = root / f"run-{out.name}"
    cmd = [sys.executable, *launcher, str(Path(__file__).resolve()), "--child-plan", str(out), "--", "pretrain",
           str(root / "plan.json"), "--run_dir", str(run), *flags]
    # glibc's default mmap threshold rises after the first large free, after which freed tensors stay in the
    # heap and RSS keeps every tensor that ever lived; a fixed 128 KiB threshold hands them back, so RSS follows
    # the live tensors (without it the 1-process peak read ~20% and FSDP's ~140% above the planner).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    peaks = []
    for rank in range(nproc):
        r = json.loads((out / f"rank{rank}.json").read_text())
        peaks.append((r["peak_kib"] - r["baseline_kib"]) / 1024)
    return peaks, from_dict(ModelConfig, json.loads((run / "config.json").read_text())["model"])


def plan_rows(results: Path) -> None:
    """Peak memory per rank of each layout, measured vs the planner (fp32 weights, grads, AdamW, activations)."""
    load = os.getloadavg()[0]
    machine = machine_line(parallel=f"1-2 processes x 1 thread, {os.cpu_count()} cores",
                           extra=f"load average {load:.1f} at start")
    rows, notes = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_random_shards(root / "shards", 100_000)
        for name, flags, layout in PLAN_LAYOUTS:
            peaks, model = measured_peaks(root, name, flags)
            setup = PlanConfig(model=model, gpus=layout.gpus, seq_len=PLAN_MODEL["max_seq_len"],
                               global_batch=PLAN_BATCH, precision="fp32")
            predicted = evaluate(layout, setup)["memory_gib"]
            for rank, mib in enumerate(peaks):
                # PP: the planner's activations are the busier stage's; its states are per stage (even split)
                plan_mib = predicted["total"] * 1024
                who = f", rank {rank}" if len(peaks) > 1 else ""
                rows.append((f"peak memory per rank MiB, {name}{who}: measured vs planner", fmt(mib),
                             fmt(plan_mib), f"{mib / plan_mib:.2f}"))
            parts = ", ".join(f"{k} {v * 1024:.0f}" for k, v in predicted.items() if k != "total")
            notes.append(f"{name}: planner {parts} MiB")
    command = COMMAND + " --plan"
    print(table(rows, machine, command))
    print("\n".join(notes))
    print(f"\nmodel {num_params(model) / 1e6:.1f}M parameters (d640 x 8 layers), vocab {VOCAB}, seq "
          f"{PLAN_MODEL['max_seq_len']}, global batch {PLAN_BATCH}, "
          f"{PLAN_STEPS} steps, fp32 AdamW. Wall time {time.perf_counter() - t0:.0f} s.")
    append_results(results, rows, machine, command)


def fmt(v: float | str) -> str:
    return v if isinstance(v, str) else f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def cells(rows: list) -> list[tuple[str, str, str, str]]:
    return [(fig, fmt(ours), fmt(peer), f"{ratio:.2f}") for fig, ours, peer, ratio in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--only", choices=["all", "ep"], default="all", help="ep: only the expert-parallel rows")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    ap.add_argument("--child-ac", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-plan", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan", action="store_true",
                    help="only the planner-vs-measured peak memory rows, appended to --results")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--pipeline", action="store_true", help="only the pipeline-parallel rows, appended to --results")
    args = ap.parse_args()
    if args.child_plan:
        return child_plan(args.child_plan, [a for a in args.rest if a != "--"])
    if args.plan:
        plan_rows(Path(args.results))
        return 0
    if args.pipeline:
        pipeline_rows(args.steps, Path(args.results))
        return 0
    if args.child_ac:
        child_peak_rss(args.child_ac)
        return 0
    machine = machine_line(parallel=f"{os.cpu_count()} cores", extra=f"load average {os.getloadavg()[0]:.1f} at start")
    t0 = time.perf_counter()
    command = COMMAND + (f" --only ep --steps {args.steps}" if args.only == "ep" else "")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_random_shards(root / "shards")
        ep_rows = cells(expert_rows(root, args.steps))
        append_results(Path(args.results), ep_rows, machine, command)
        if args.only == "ep":
            print(table(ep_rows, machine, command))
            print(f"\nmodel: d128 x 4 layers, 8 experts top-2 d_ff 128 in every block, seq 128, global batch 16, "
                  f"{args.steps} steps, fp32. Wall time {time.perf_counter() - t0:.0f} s.")
            return 0
        one_1 = pretrain_tokens_per_s(root, "one-1t", 1, args.steps)
        one_2 = pretrain_tokens_per_s(root, "one-2t", 2, args.steps)
        ddp = pretrain_tokens_per_s(root, "ddp", 1, args.steps, "--nproc", "2", "--parallel.data", "ddp")
        fsdp = pretrain_tokens_per_s(root, "fsdp", 1, args.steps, "--nproc", "2", "--parallel.data", "fsdp")
    ac = {mode: saved_activation_bytes(mode) for mode in ("none", "every_n", "full")}
    rss = {mode: peak_rss_mib(mode) for mode in ("none", "full")}
    mib = {mode: b / 2**20 for mode, (b, _) in ac.items()}
    rows = [
        ("tokens/s, DDP 2 proc x 1 thread vs 1 proc x 1 thread", ddp, one_1, ddp / one_1),
        ("scaling efficiency DDP (tok/s_2 / (2 x tok/s_1))", f"{ddp / (2 * one_1):.0%}", "100%", ddp / (2 * one_1)),
        ("tokens/s, DDP 2 proc x 1 thread vs 1 proc x 2 threads", ddp, one_2, ddp / one_2),
        ("tokens/s, FSDP2 2 proc x 1 thread vs 1 proc x 2 threads", fsdp, one_2, fsdp / one_2),
        ("activation memory saved for backward, MiB: AC full vs none", mib["full"], mib["none"],
         mib["full"] / mib["none"]),
        ("activation memory saved for backward, MiB: AC every 2nd block vs none", mib["every_n"], mib["none"],
         mib["every_n"] / mib["none"]),
        ("peak RSS of a 3-step training process, MiB: AC full vs none", rss["full"], rss["none"],
         rss["full"] / rss["none"]),
        ("step time (fwd+bwd), s: AC full vs none", ac["full"][1], ac["none"][1], ac["full"][1] / ac["none"][1]),
    ]
    print(table(cells(rows) + ep_rows, machine, COMMAND))
    print(f"\nmodels: scaling d128 x 4 layers, seq 128, global batch 16, {args.steps} steps, fp32; AC d256 x 6 "
          f"layers, batch {AC_BATCH} x 256. Wall time {time.perf_counter() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
