"""Distributed checkpoints (torch.distributed.checkpoint): each rank writes its own shards in parallel, and a
checkpoint saved by N processes loads on M (DCP reshards by fully-qualified parameter name).

Same layout and atomicity as `lmforge.checkpoint.store` (which single-process runs keep using):
    RUN/checkpoints/step_000123/.metadata, __<rank>_0.distcp   model + optimizer shards (DCP)
    RUN/checkpoints/step_000123/config.json                     the model config (`check_model_config`)
    RUN/checkpoints/step_000123/trainer_state.json              step, loader, counters, rng (rank 0's)
    RUN/checkpoints/latest
All ranks write into `.tmp-step_000123`; rank 0 adds the JSON, renames it into place and moves `latest`.
The model's tensors are saved in the training layout: with tensor parallelism the fused qkv/up rows
are permuted (lmforge.parallel.tp), so such a checkpoint resumes only at the same parallel.tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.checkpoint.store import (
    STATE_NAME,
    check_model_config,
    checkpoint_name,
    checkpoints_dir,
    latest_checkpoint,
    load_checkpoint,
    publish_checkpoint,
    rng_state,
    set_rng_state,
)
from lmforge.core.config import to_dict
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.files import atomic_write_json, atomic_write_text, fsync_dir, read_json_object
from lmforge.model.io import CONFIG_NAME

DCP_MARKER = ".metadata"  # torch.distributed.checkpoint itself is imported when used: it costs seconds
_TMP_PREFIX = ".tmp-"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_dcp_checkpoint(path: Path) -> bool:
    return (path / DCP_MARKER).is_file()


def save_dcp_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], keep: int, model_cfg: Any) -> Path:
    """Collective: every rank calls it with its (sharded) model and optimizer; returns the final directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = checkpoints_dir(run_dir)
    name = checkpoint_name(step)
    tmp, final = root / f"{_TMP_PREFIX}{name}", root / name
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(_TMP_PREFIX + "*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if _rank() == 0:
        atomic_write_json(tmp / CONFIG_NAME, {"model": to_dict(model_cfg)})
        atomic_write_text(tmp / STATE_NAME, json.dumps({"step": step, **state, "rng": rng_state()}, indent=1) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        publish_checkpoint(run_dir, tmp, name, keep)
    _barrier()
    return final


def load_dcp_checkpoint(run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                        tensor: int = 1) -> dict[str, Any] | None:
    """Collective inverse of `save_dcp_checkpoint` for any number of processes (one, without a process
    group, included); None when there is none. `tensor` is this run's tensor-parallel degree."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    if not is_dcp_checkpoint(path):
        raise LmforgeError(f"{path} is a single-process checkpoint (no {DCP_MARKER}); resume it with "
                           "parallel.data=none and parallel.tensor=1, or start a new run_dir")
    check_model_config(path, _plain(model))
    saved = read_json_object(path / STATE_NAME)
    saved_tp = saved.get("parallel", {}).get("tensor", 1)
    if saved_tp != tensor:
        raise ConfigError(f"{path}: saved with parallel.tensor={saved_tp}, this run has parallel.tensor={tensor}; "
                          "tensor-parallel checkpoints resume at the same degree (the data-parallel size may "
                          "change)")
    model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None else (
        get_state_dict(model, [])[0], None)
    target = {"model": model_sd} if optim_sd is None else {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():  # a plain 1-process resume: DCP warns that it assumes no process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    else:
        set_state_dict(model, [], model_state_dict=target["model"], optim_state_dict={})
    set_rng_state(saved["rng"])
    return saved


def load_any_checkpoint(run_dir: str | Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """A single-process run's resume: safetensors checkpoints, or a distributed one (resumed at 1 process)."""
    path = latest_checkpoint(run_dir)
    if path is not None and is_dcp_checkpoint(path):
        return load_dcp_checkpoint(run_dir, model, optimizer)
    return load_checkpoint(run_dir, model, optimizer)


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The module with `.cfg` under a DDP wrapper."""
    return getattr(model, "module", model) if not hasattr(model, "cfg") else model
