"""Run one function over many shard tasks: in-process, on a local process pool (default), or on Ray.

Sharding is by input file and deterministic, and each task writes its own completion marker, so
any executor can stop and a rerun only does the shards without one. Results come back in task order.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Literal

from lmforge.core.errors import LmforgeError

ExecutorName = Literal["local", "ray"]
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the signal a process gets when its parent dies


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def map_shards(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int = 0, executor: ExecutorName = "local",
               on_result: Callable[[Any], None] | None = None) -> list[Any]:
    """`[fn(t) for t in tasks]` on `workers` processes (0: all cores); `on_result` sees each as it finishes."""
    workers = workers or default_workers()
    if executor == "ray":
        return _map_ray(fn, tasks, workers, on_result)
    if workers <= 1 or len(tasks) <= 1:
        results = []
        for t in tasks:
            results.append(fn(t))
            if on_result:
                on_result(results[-1])
        return results
    out: list[Any] = [None] * len(tasks)
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(fn, t): i for i, t in enumerate(tasks)}
        for fut in as_completed(futures):
            out[futures[fut]] = fut.result()
            if on_result:
                on_result(out[futures[fut]])
    return out


def die_with_parent(parent_pid: int) -> None:
    """Pool worker initializer: end this worker when the process that started the pool dies (even by SIGKILL),
    instead of running on as an orphan. Linux asks the kernel (PR_SET_PDEATHSIG); elsewhere a daemon thread
    watches for the worker being re-parented."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before the request took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="lmforge-parent-watch", daemon=True).start()


def _watch_parent(parent_pid: int, interval_s: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval_s)
    os._exit(1)


def _map_ray(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int,
             on_result: Callable[[Any], None] | None) -> list[Any]:
    """Ray tasks, one per shard (NeMo-Curator's and DCLM's scale-out engine). Joins a running cluster
    when RAY_ADDRESS is set, else starts a local instance with `workers` CPUs."""
    try:
        import ray
    except ImportError:
        raise LmforgeError("--executor ray needs the ray extra (pip install 'lmforge[ray]')") from None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if not os.environ.get("RAY_ADDRESS"):
            kwargs["num_cpus"] = workers
        ray.init(**kwargs)
    remote = ray.remote(num_cpus=1)(fn)
    refs = [remote.remote(t) for t in tasks]
    index = {ref: i for i, ref in enumerate(refs)}
    out: list[Any] = [None] * len(tasks)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            out[index[ref]] = ray.get(ref)
            if on_result:
                on_result(out[index[ref]])
    return out
