"""Distributed checkpoints (torch.distributed.checkpoint): each rank writes its own shards in parallel, and a
checkpoint saved by N processes loads on M (DCP reshards by fully-qualified parameter name).

Same layout and atomicity as `lmforge.checkpoint.store` (which single-process runs keep using):
    RUN/checkpoints/step_000123/.metadata, __<rank>_0.distcp   model + optimizer shards (DCP)
    RUN/checkpoints/step_000123/config.json                     the model config (`check_model_config`)
    RUN/checkpoints/step_000123/trainer_state.json              step, loader, counters, rng (rank 0's), "format": "dcp"
    RUN/checkpoints/step_000123/checksums.json                  sha256 of every other file
    RUN/checkpoints/latest
All ranks write into `.tmp-step_000123`; rank 0 adds the JSON, renames it into place and moves `latest`.

DCP's `.metadata` is a pickle, and its byte items go through `torch.load(weights_only=False)`. Neither is read
unless the run's own trainer_state.json says it saved a distributed checkpoint and every file matches the sha256
recorded at save time; even then `.metadata` is read by an unpickler that builds only DCP's metadata classes, and
byte items only with `weights_only=True`, so a planted or forged file runs no code.
The model's tensors are saved in the training layout: with tensor parallelism the fused qkv/up rows
are permuted (lmforge.parallel.tp), so such a checkpoint resumes only at the same parallel.tensor.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.checkpoint.store import (
    STATE_NAME,
    all_finite,
    check_model_config,
    checkpoint_name,
    checkpoints_dir,
    load_checkpoint_at,
    publish_checkpoint,
    refuse_non_finite,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
    write_checksums,
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
    """Whether the checkpoint's own trainer state says it is a distributed checkpoint (a `.metadata` file alone
    does not make one)."""
    state = path / STATE_NAME
    return state.is_file() and read_json_object(state).get("format") == "dcp"


def save_dcp_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], keep: int, model_cfg: Any) -> Path:
    """Collective: every rank calls it with its (sharded) model and optimizer; returns the final directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    device = next(model.parameters()).device  # NCCL reduces only CUDA tensors
    finite = torch.tensor([float(all_finite(model.parameters()))], device=device)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    refuse_non_finite(run_dir, step, bool(finite.item()))
    root = checkpoints_dir(run_dir)
    name = checkpoint_name(step)
    tmp, final = root / f"{_TMP_PREFIX}{name}", root / name
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(_TMP_PREFIX + "*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # a 1-process save: DCP warns that it assumes no process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if _rank() == 0:
        atomic_write_json(tmp / CONFIG_NAME, {"model": to_dict(model_cfg)})
        atomic_write_text(tmp / STATE_NAME, json.dumps({"step": step, **state, "format": "dcp", "rng": rng_state()},
                                                       indent=1) + "\n")
        write_checksums(tmp)
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

    found = resolve_checkpoint(run_dir)
    if found is None:
        return None
    path, saved = found
    if saved.get("format") != "dcp":
        raise LmforgeError(f"{path} is a single-process checkpoint ({STATE_NAME} names no distributed checkpoint); "
                           "resume it with parallel.data=none and parallel.tensor=1, or start a new run_dir")
    check_model_config(path, _plain(model))
    saved_tp = saved.get("parallel", {}).get("tensor", 1)
    if saved_tp != tensor:
        raise ConfigError(f"{path}: saved with parallel.tensor={saved_tp}, this run has parallel.tensor={tensor}; "
                          "tensor-parallel checkpoints resume at the same degree (the data-parallel size may "
                          "change)")
    read_dcp_metadata(path / DCP_MARKER)  # a forged file is one clear line here, not an error from inside DCP
    model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None else (
        get_state_dict(model, [])[0], None)
    target = {"model": model_sd} if optim_sd is None else {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():  # a plain 1-process resume: DCP warns that it assumes no process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        reader, planner = _safe_loaders()
        dcp.load(target, checkpoint_id=str(path), storage_reader=reader(str(path)), planner=planner(),
                 no_dist=not dist.is_initialized())
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    else:
        set_state_dict(model, [], model_state_dict=target["model"], optim_state_dict={})
    set_rng_state(saved["rng"])
    return saved


def load_any_checkpoint(run_dir: str | Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """A single-process run's resume: safetensors checkpoints, or a distributed one (resumed at 1 process)."""
    found = resolve_checkpoint(run_dir)
    if found is None:
        return None
    if found[1].get("format") == "dcp":
        return load_dcp_checkpoint(run_dir, model, optimizer)
    return load_checkpoint_at(*found, model, optimizer)


# ----------------------------------------------------------------------------------------------
# reading DCP files without running code


def _allowed_global(module: str, name: str) -> bool:
    """What DCP's `.metadata` pickle may name: its own metadata classes, torch.Size, dtypes, layouts, paths."""
    import torch.distributed.checkpoint.metadata as md

    if module == md.__name__:
        obj = getattr(md, name, None)
        return isinstance(obj, type) and obj.__module__ == module
    return ((module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                               ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                               ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                               ("pathlib", "PureWindowsPath")}
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))


def read_dcp_metadata(path: Path) -> Any:
    """DCP's metadata pickle, unpickled with only DCP's own classes allowed (`_allowed_global`)."""
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as e:
        raise LmforgeError(f"{path}: not a DCP metadata file ({e})") from None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed_global(module, name):
            raise pickle.UnpicklingError(f"'{module}.{name}' is not allowed in a DCP .metadata file")
        return super().find_class(module, name)


@cache
def _safe_loaders() -> tuple[type, type]:
    """A FileSystemReader whose metadata comes from `_MetadataUnpickler`, and a load planner that reads byte items
    (optimizer hyperparameters) with `torch.load(weights_only=True)`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            name = DCP_MARKER if kwargs.get("rank") is None else f"__{kwargs['rank']}{DCP_MARKER}"
            metadata = read_dcp_metadata(Path(self.path) / name)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            plain = io.BytesIO()
            torch.save(torch.load(value, weights_only=True), plain)  # the base class unpickles it fully
            plain.seek(0)
            super().load_bytes(read_item, plain)

    return Reader, Planner


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The module with `.cfg` under a DDP wrapper."""
    return getattr(model, "module", model) if not hasattr(model, "cfg") else model
