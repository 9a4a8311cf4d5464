"""What every benchmark shares: the import path, the machine line, the RESULTS.md table, timing helpers.

Import it before anything else that may import HF `peft` or `transformers`: importing it drops benchmarks/
from the import path (a script's own folder comes first there, and benchmarks/peft.py would shadow the `peft`
package) and appends tests/ (the text fixtures some benchmarks build their corpus from).

Every table has the columns of benchmarks/RESULTS.md: figure | lmforge | peer | ratio | machine | command.
"""

from __future__ import annotations

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.append(os.path.join(os.path.dirname(HERE), "tests"))

import contextlib  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from lmforge.core.runtime import autocast  # noqa: E402
from lmforge.train.config import TrainConfig  # noqa: E402
from lmforge.train.objectives import causal_lm_loss  # noqa: E402
from lmforge.train.optim import build_optimizer  # noqa: E402
from lmforge.train.pretrain import lm_loss  # noqa: E402

# /proc/cpuinfo flag -> name; what decides the bf16 matmul peak of a CPU
CPU_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512-BF16", "amx_bf16": "AMX"}
RESULTS = Path(HERE) / "RESULTS.md"  # where `report` appends ($LMFORGE_BENCH_RESULTS elsewhere)
HEADER = "| figure | lmforge | {peer} | ratio | machine | command |"
RULE, RULE_NUMERIC = "|---|---|---|---|---|---|", "|---|---:|---:|---:|---|---|"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def cpu_name() -> str:
    """CPU model and its matmul-relevant instruction sets, e.g. `AMD EPYC 9454 (AVX2, AVX-512, AVX-512-BF16)`."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    present = [label for flag, label in CPU_FLAGS.items() if flag in flags]
    return f"{name} ({', '.join(present)})" if present else name


def machine_line(device: torch.device | str = "cpu", parallel: str = "", extra: str = "") -> str:
    """The machine column: GPU (when `device` is CUDA), CPU and flags, threads (or `parallel`: what the
    benchmark ran in parallel, e.g. "2 workers"), torch version, then `extra` (e.g. a measured peak)."""
    device = torch.device(device)
    parts = [torch.cuda.get_device_name(device)] if device.type == "cuda" else []
    threads = torch.get_num_threads()
    parts += [cpu_name(), parallel or f"{threads} thread{'s' if threads != 1 else ''}", f"torch {torch.__version__}"]
    return ", ".join(parts + ([extra] if extra else []))


def script_command() -> str:
    """How this benchmark was run, for the command column: `python benchmarks/x.py --flag ...`, the script named from
    the repository root whatever directory it was run from (`append_results` files rows by that name)."""
    script = Path(sys.argv[0])
    if script.resolve().parent == Path(__file__).resolve().parent:
        script = Path("benchmarks") / script.name
    return "python " + " ".join([script.as_posix(), *sys.argv[1:]])


def table_rows(rows: Iterable[Sequence[Any]], machine: str, command: str) -> list[str]:
    """One markdown row per (figure, lmforge, peer, ratio), the cells already formatted."""
    return [f"| {figure} | {ours} | {peer} | {ratio} | {machine} | `{command}` |" for figure, ours, peer, ratio in rows]


def table(rows: Iterable[Sequence[Any]], machine: str, command: str, peer: str = "peer",
          numeric: bool = False) -> str:
    """The whole table: header (`peer` names the peer column), rule (right-aligned numbers when `numeric`), rows."""
    head = [HEADER.format(peer=peer), RULE_NUMERIC if numeric else RULE]
    return "\n".join(head + table_rows(rows, machine, command))


def script_of(command: str) -> str | None:
    """`benchmarks/x.py` in a command line, or None."""
    found = re.search(r"benchmarks/[\w.-]+\.py", command)
    return found.group(0) if found else None


def append_results(path: Path, rows: Iterable[Sequence[Any]], machine: str, command: str) -> None:
    """File rows in RESULTS.md at `path` under the section of the script that made them: after the last table
    row of the first `## ...` section whose heading names `benchmarks/x.py` (with a table header when that section
    has no table yet), else in a new section for the script at the end. Rows appended at the very end would land
    in whatever section comes last, where a markdown table without its header does not render."""
    header = f"{HEADER.format(peer='peer')}\n{RULE}"
    new_rows = table_rows(rows, machine, command)
    lines = (path.read_text() if path.exists() else "# Benchmark results\n").rstrip("\n").split("\n")
    script = script_of(command) or "other"
    starts = [i for i, line in enumerate(lines) if line.startswith("## ")]
    mine = next((i for i in starts if f"`{script}`" in lines[i]), None)
    if mine is None:
        lines += ["", f"## `{script}`", "", header, *new_rows]
    else:
        end = next((i for i in starts if i > mine), len(lines))
        table_ends = [i for i in range(mine, end) if lines[i].startswith("|")]
        if table_ends:
            at = table_ends[-1] + 1
            lines[at:at] = new_rows
        else:
            while end > mine + 1 and not lines[end - 1].strip():
                end -= 1
            lines[end:end] = ["", header, *new_rows, ""]
    path.write_text("\n".join(lines) + "\n")


def report(rows: Sequence[Sequence[Any]], machine: str, command: str, limit: str, peer: str = "peer",
           numeric: bool = False, append: bool = True) -> None:
    """Print the limit the figures are measured against (a matmul peak, a bandwidth, or what bounds them when
    no physical limit applies) and the table; append the rows to RESULTS.md (unless not `append`), with the limit
    in the machine column."""
    print(f"\nlimit: {limit}\n")
    print(table(rows, machine, command, peer=peer, numeric=numeric))
    if append:
        path = Path(os.environ.get("LMFORGE_BENCH_RESULTS") or RESULTS)
        append_results(path, rows, f"{machine}, limit: {limit}", command)
        print(f"\nappended {len(rows)} rows to {path}")


@contextlib.contextmanager
def scratch_dir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A fresh temporary folder for a benchmark's inputs and outputs, removed afterwards unless `keep`."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work, so a timer around it measures the work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[Hashable, Callable[[], Any]], reps: int, warmup: int = 1,
                device: torch.device | str = "cpu") -> tuple[dict[Any, float], dict[Any, Any]]:
    """Median seconds of each fn over `reps` rounds after `warmup` untimed rounds, and each fn's last output.

    The fns alternate within a round (A B C A B C ...), so the load other processes put on a shared machine
    falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[Hashable, list[float]] = {name: [] for name in fns}
    outputs: dict[Hashable, Any] = {}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            outputs[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def matmul_seconds(a: torch.Tensor, b: torch.Tensor, reps: int,
                    clock: Callable[[], float] = time.perf_counter) -> float:
    """The fastest of `reps` products: other processes' load only ever slows one down."""
    best = math.inf
    for _ in range(reps):
        start = clock()
        a @ b
        best = min(best, clock() - start)
    return best


def matmul_peak(dtype: torch.dtype, budget_s: float = 1.0, max_n: int = 2048,
                clock: Callable[[], float] = time.perf_counter) -> float:
    """FLOP/s of square CPU matmuls in `dtype`: the ceiling a training step's FLOP/s is held against.

    Probes 256^2 first and doubles n (up to `max_n`) only while the next size fits in what is left of
    `budget_s`, so a dtype the CPU runs slowly (bf16 without AVX-512-BF16/AMX: ~100x below fp32) costs about
    `budget_s`, not minutes. Returns the rate of the largest size probed (its fastest product: cache-resident
    small sizes would overstate what a training step's matmuls can reach). `clock=time.process_time` gives
    FLOP per CPU-second instead (steadier on a loaded machine; with one thread, the single core's peak)."""
    deadline = time.perf_counter() + budget_s
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        one = matmul_seconds(a, b, 1)  # warm-up, and the cost of one product at this size
        reps = max(1, min(20, int(0.25 * (deadline - time.perf_counter()) / max(one, 1e-9))))
        rate = 2 * n**3 / max(matmul_seconds(a, b, reps, clock), 1e-9)
        # the next size costs ~8x per product; probe it only when a warm-up and 3 products fit the budget
        if 2 * n > max_n or 4 * 8 * one > deadline - time.perf_counter():
            return rate
        n *= 2


def bf16_skip_reason(peaks: dict[str, float]) -> str:
    """Why bf16 rows are skipped on this CPU ("" when they are not): its bf16 matmuls run slower than fp32's
    (no AVX-512-BF16 or AMX, so bf16 is emulated), and a bf16 benchmark would measure the emulation for minutes."""
    if peaks["bf16"] >= peaks["fp32"]:
        return ""
    return (f"bf16 skipped: the bf16 matmul peak ({peaks['bf16'] / 1e9:.1f} GFLOP/s) is below fp32's "
            f"({peaks['fp32'] / 1e9:.1f} GFLOP/s) on this CPU ({cpu_name()}): no fast bf16")


def matmul_peaks(budget_s: float = 1.0) -> dict[str, float]:
    """{"fp32": FLOP/s, "bf16": FLOP/s} of this CPU (`matmul_peak`, each within ~`budget_s`)."""
    return {"fp32": matmul_peak(torch.float32, budget_s), "bf16": matmul_peak(torch.bfloat16, budget_s)}


def peak_line(peaks: dict[str, float]) -> str:
    """The limit a CPU benchmark is measured against, for its output and machine column."""
    return f"matmul peak fp32 {peaks['fp32'] / 1e9:.0f} / bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s"


def memory_bandwidth(mbytes: int = 64, reps: int = 5) -> float:
    """Bytes/s of a STREAM-style triad a = b + s*c over three `mbytes` MB fp32 tensors on CPU, best of `reps`:
    the ceiling of a memory-bound kernel, such as batch-1 decoding (which reads every weight once a token).
    Counts the bytes STREAM counts: two arrays read, one written."""
    n = mbytes * 2**20 // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    best = float("inf")
    for _ in range(reps + 1):  # the first round faults the output's pages in
        start = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - start)
    return 3 * n * 4 / best


def training_step(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, precision: str,
                  hf: bool = False, runner: torch.nn.Module | None = None) -> Callable[[], float]:
    """One full CPU training step, repeatable: forward under `precision` autocast, loss, backward, clip to 1.0,
    AdamW (`build_optimizer`, lr 1e-4) over `model`'s trainable tensors; returns the loss.

    lmforge models go through the trainer's loss (`lm_loss`, LM head fused with the cross-entropy); `hf` models
    through their logits. `runner` (e.g. the compiled model) runs the forward in place of `model`."""
    opt = build_optimizer(model, TrainConfig(lr=1e-4))
    run = runner or model
    device = torch.device("cpu")

    def step() -> float:
        with autocast(device, precision):
            loss = causal_lm_loss(run(input_ids=inputs).logits, targets) if hf else lm_loss(run, (inputs, targets))[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step
