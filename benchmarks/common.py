"""What every benchmark shares: the import path, the machine line, the RESULTS.md table, timing helpers.

Import it before anything else that may import HF `peft` or `transformers`: importing it drops benchmarks/
from the import path (a script's own folder comes first there, and benchmarks/peft.py would shadow the `peft`
package) and appends tests/ (the text fixtures some benchmarks build their corpus from).

Every table has the columns of benchmarks/RESULTS.md: figure | lmforge | peer | ratio | machine | command.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.append(os.path.join(os.path.dirname(HERE), "tests"))

import contextlib  # noqa: E402
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
    """How this benchmark was run, for the command column: `python benchmarks/x.py --flag ...`."""
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def table_rows(rows: Iterable[Sequence[Any]], machine: str, command: str) -> list[str]:
    """One markdown row per (figure, lmforge, peer, ratio), the cells already formatted."""
    return [f"| {figure} | {ours} | {peer} | {ratio} | {machine} | `{command}` |" for figure, ours, peer, ratio in rows]


def table(rows: Iterable[Sequence[Any]], machine: str, command: str, peer: str = "peer",
          numeric: bool = False) -> str:
    """The whole table: header (`peer` names the peer column), rule (right-aligned numbers when `numeric`), rows."""
    head = [HEADER.format(peer=peer), RULE_NUMERIC if numeric else RULE]
    return "\n".join(head + table_rows(rows, machine, command))


def append_results(path: Path, rows: Iterable[Sequence[Any]], machine: str, command: str) -> None:
    """Append rows to RESULTS.md at `path`, with a header first when the file has none yet."""
    header = f"{HEADER.format(peer='peer')}\n{RULE}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if header not in text:
        text += "\n" + header
    path.write_text(text.rstrip("\n") + "\n" + "\n".join(table_rows(rows, machine, command)) + "\n")


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


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 20) -> float:
    """FLOP/s of an n x n CPU matmul in `dtype`: the ceiling a training step's FLOP/s is held against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


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
