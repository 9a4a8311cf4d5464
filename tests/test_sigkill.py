"""A 2-process run survives SIGKILL of one worker: the launcher names the dead rank in one line, and a rerun
with --resume continues from the last distributed checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.checkpoint.store import latest_checkpoint
from lmforge.train.metrics import read_metrics
from recipes import parallel_recipe


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def worker_with_rank(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's worker process whose RANK is `rank` (workers are its direct children)."""
    for pid in children(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def cli(run_dir: Path, recipe: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "lmforge", "pretrain", str(recipe), "--run_dir", str(run_dir), "--nproc", "2",
            "--parallel.data", "ddp", *overrides]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the worker")
def test_sigkill_one_worker_then_resume(learnable_data, tmp_path):
    recipe = tmp_path / "recipe.json"
    cfg = parallel_recipe(learnable_data)
    cfg["train"].update(steps=100000, save_every=4, keep_checkpoints=2, log_every=1)
    recipe.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cli(run, recipe), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            latest = latest_checkpoint(run) if (run / "checkpoints" / "latest").exists() else None
            if latest is not None and latest.name >= "step_000008":
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        victim = worker_with_rank(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    message = [line for line in err.splitlines() if line.startswith("lmforge: error:")]
    assert len(message) == 1, err[-2000:]
    assert f"worker rank 1 was killed by SIGKILL (pid {victim})" in message[0]
    saved = latest_checkpoint(run)
    assert f"continue from the last checkpoint ({saved.name})" in message[0]
    step = int(saved.name.split("_")[1])

    out = subprocess.run(cli(run, recipe, "--resume", "true", "--train.steps", str(step + 3)),
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming {run} from step {step}" in out.stderr
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, step + 4))  # rows past the checkpoint were dropped, then continued
    assert (run / "model" / "model.safetensors").is_file()
