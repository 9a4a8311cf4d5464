"""Pretraining recipes and launches the training tests share: a tiny in-process `PretrainConfig`, the
distributed tests' recipe, and `torchrun` the way the docs launch it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmforge.checkpoint.store import LATEST_NAME, checkpoint_name, checkpoints_dir, list_checkpoints
from lmforge.core.config import from_dict
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import PretrainConfig

REL = 1e-5  # loss tolerance (relative) between process counts: fp32 all-reduce order only
STEPS = 6  # optimizer steps of `parallel_recipe`
VOCAB = 64  # parallel_recipe's vocabulary: that of fakes.learnable_shards' default


def parallel_recipe(data: Path) -> dict[str, Any]:
    """A pretraining recipe over DATA/train small enough for 2 CPU processes: checkpoints at steps 3 and 6."""
    return {"data": {"path": str(data), "seq_len": 16, "batch_size": 8},
            "model": {"preset": "debug", "vocab_size": VOCAB, "max_seq_len": 32},
            "train": {"steps": STEPS, "lr": 3e-3, "warmup_steps": 2, "precision": "fp32", "device": "cpu",
                      "log_every": 1, "eval_every": 0, "save_every": 3, "keep_checkpoints": 0, "plot_every": 0}}


def recipe_file(root: Path, data: Path) -> Path:
    """`parallel_recipe(data)` written to ROOT/recipe.json, for torchrun launches."""
    path = root / "recipe.json"
    path.write_text(json.dumps(parallel_recipe(data)))
    return path


def tiny_pretrain_config(tmp_path: Path, data: dict[str, Any], steps: int = 5, **train: Any) -> PretrainConfig:
    """A 1-layer d_model-32 run over tmp_path's data, writing tmp_path/run; `data` and `train` add keys."""
    return from_dict(PretrainConfig, {
        "run_dir": str(tmp_path / "run"),
        "model": {"preset": "debug", "d_model": 32, "n_layers": 1, "d_ff": 64},
        "data": {"path": str(tmp_path), "seq_len": 16, "batch_size": 4, **data},
        "train": {"steps": steps, "lr": 1e-3, "warmup_steps": 1, "precision": "fp32", "log_every": 2,
                  "eval_every": 0, "save_every": 0, "plot_every": 0, **train}})


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`python ARGS` with one OpenMP thread per process (several share the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


def torchrun(config: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    """The documented launch: torchrun --nproc-per-node N -m lmforge pretrain RECIPE."""
    out = run_cli(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "lmforge",
                   "pretrain", str(config), *overrides])
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def rewind(run: Path, to: Path, step: int) -> Path:
    """A copy of run directory `run` at `to` whose latest checkpoint is `step` (as if the run had stopped there)."""
    shutil.copytree(run, to)
    for saved, path in list_checkpoints(to):
        if saved > step:
            shutil.rmtree(path)
    (checkpoints_dir(to) / LATEST_NAME).write_text(checkpoint_name(step) + "\n")
    return to


def losses(run_dir: Path) -> list[float]:
    """The training loss of every logged step."""
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def loop_config(**overrides: Any) -> TrainConfig:
    """A `train_loop` config for tiny CPU runs: fp32, a log row every step, no eval, saves or plots unless asked."""
    base = {"steps": 8, "lr": 3e-3, "warmup_steps": 2, "precision": "fp32", "device": "cpu", "log_every": 1,
            "eval_every": 0, "save_every": 0, "plot_every": 0}
    return from_dict(TrainConfig, {**base, **overrides})
