"""Process groups and launching: torchrun's environment in, `lmforge pretrain --nproc N` as a convenience.

`torchrun --nproc-per-node N -m lmforge pretrain RECIPE` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
MASTER_PORT for every worker; `init_process_group` reads them (env:// rendezvous). A single process that asks
for parallelism without torchrun gets a world of one, so the same code path (and DCP checkpoints) work there.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.checkpoint.store import latest_checkpoint
from lmforge.core.config import to_dict
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.files import atomic_write_json
from lmforge.core.runtime import resolve_device

WORKER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in WORKER_ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend: str, device: torch.device) -> bool:
    """Join (or, for a lone process, create) the default group; returns True when this call created it."""
    if dist.is_initialized():
        return False
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    if not under_torchrun():  # a world of one, no launcher; os.environ stays untouched for child processes
        kwargs.update(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    dist.init_process_group(backend, **kwargs)
    return True


def local_device(name: str) -> torch.device:
    """cuda:LOCAL_RANK under a launcher on a GPU machine, else the requested device."""

    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def describe_failure(rank: int, exitcode: int | None) -> str:
    """'worker rank 1 was killed by SIGKILL' / 'worker rank 0 exited with code 3'."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"worker rank {rank} was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"worker rank {rank} exited with code {exitcode}"


def first_failure(failures: dict[int, Any]) -> tuple[int, Any]:
    """The rank that brought the run down. A worker killed by a signal (SIGKILL, SIGSEGV) comes first, then one
    that exited with an error; SIGTERM comes last: the launcher sends it to the survivors when tearing down."""

    def rank_key(item: tuple[int, Any]) -> tuple[int, float, int]:
        code = item[1].exitcode
        kind = 2 if code == -signal.SIGTERM else 0 if code is not None and code < 0 else 1
        return kind, getattr(item[1], "timestamp", 0), item[0]

    return min(failures.items(), key=rank_key)


def launch(nproc: int, config_path: Path, run_dir: Path, command: str = "pretrain") -> int:
    """Run `python -m lmforge COMMAND CONFIG` on `nproc` local workers via torch.distributed's elastic launcher.

    A worker that dies (a crash, SIGKILL, OOM) takes the others down; this returns a one-line LmforgeError
    naming the first rank that failed and how to resume, instead of the launcher's traceback.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"lmforge-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                          monitor_interval=0.2)
    args = ["-m", "lmforge", *command.split(), str(config_path)]
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as e:
        rank, failure = first_failure(e.failures)
        latest = latest_checkpoint(run_dir)
        where = f"the last checkpoint ({latest.name})" if latest else "the start (no checkpoint was saved)"
        log = f" (its output: {run_dir / 'logs' / f'rank_{rank}.log'})" if rank else ""
        raise LmforgeError(f"{describe_failure(rank, failure.exitcode)} (pid {failure.pid}){log}; the run "
                           f"stopped. Rerun with --resume true to continue from {where}") from None
    return 0


def launch_pretrain(cfg: Any) -> dict[str, Any]:
    """`lmforge pretrain --nproc N`: write the resolved config to RUN/launch.json and run it on N workers."""

    if not cfg.parallel.enabled:
        raise ConfigError(f"nproc={cfg.nproc} needs parallel.data=ddp or fsdp (or parallel.tensor > 1)")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "launch.json"
    atomic_write_json(config_path, to_dict(cfg))
    print(f"launching {cfg.nproc} workers (torch.distributed elastic, {config_path})", file=sys.stderr)
    launch(cfg.nproc, config_path, run_dir)
    return {"nproc": cfg.nproc, "run_dir": str(run_dir), "model_dir": str(run_dir / "model")}
