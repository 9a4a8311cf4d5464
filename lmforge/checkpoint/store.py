"""Training checkpoints: atomic, pickle-free, and complete enough to resume a run bit for bit.

Layout of RUN/checkpoints/:
    step_000123/model.safetensors + config.json   a model directory (`lmforge.model.load_model` reads it)
    step_000123/trainable.safetensors + config.json  instead, when some parameters are frozen (PEFT): only the
                                                  trainable tensors, by parameter name; the frozen rest is the
                                                  base model the run starts from, so it is not copied
    step_000123/optimizer.safetensors             every optimizer state tensor, "state.<param_index>.<name>"
    step_000123/trainer_state.json                step, loader position, optimizer hyperparameters and
                                                  scalar state, RNG states, the format, and the caller's keys
    step_000123/checksums.json                    the sha256 of every other file of the checkpoint
    latest                                        the name of the newest complete checkpoint

A checkpoint is written into a hidden temp directory, fsynced, and renamed into place; only then is
`latest` replaced (atomically) and old checkpoints pruned. A process killed at any moment therefore
leaves `latest` naming a complete checkpoint. A resume verifies the checksums and falls back to the previous
complete checkpoint, saying so, when the latest is damaged; with `latest` gone it takes the newest complete
`step_*` directory. Weights whose values are not all finite are never saved (`NonFiniteWeights`).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from lmforge.core.config import to_dict
from lmforge.core.errors import LmforgeError
from lmforge.core.files import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    fsync_dir,
    read_json_object,
    temp_dir,
)
from lmforge.model.io import CONFIG_NAME, WEIGHTS_NAME, load_into, load_weights, read_model_config, save_model

CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
OPTIMIZER_NAME = "optimizer.safetensors"
TRAINABLE_NAME = "trainable.safetensors"
STATE_NAME = "trainer_state.json"
CHECKSUMS_NAME = "checksums.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------------------------
# optimizer and RNG state <-> (tensors, JSON)


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON (hyperparameters, scalars).

    0-dim tensors such as Adam's 'step' go to JSON as {"tensor": value, "dtype": ...}; so does any
    non-tensor state value.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, param_state in sd["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            elif isinstance(value, torch.Tensor):
                scalars.setdefault(str(idx), {})[name] = {"tensor": value.item(),
                                                          "dtype": str(value.dtype).removeprefix("torch.")}
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [{k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `optimizer_to_files`: a dict `optimizer.load_state_dict` accepts."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalar_state"].items():
        for name, value in values.items():
            if isinstance(value, dict) and "tensor" in value:
                value = torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
            state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """torch's CPU (and CUDA) generator states; dropout and any sampling in the loop draw from them."""
    out: dict[str, Any] = {"torch_cpu": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["torch_cuda"]])


# ----------------------------------------------------------------------------------------------
# save / load


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories as (step, path), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Step directories holding a trainer state (the last file a save writes before checksums), oldest first."""
    return [p for _, p in list_checkpoints(run_dir) if (p / STATE_NAME).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory `latest` names (or, with `latest` gone, the newest complete step directory); None when the
    run has no checkpoint yet. Cheap: nothing is verified (`resolve_checkpoint` does that)."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST_NAME
    complete = complete_checkpoints(run_dir)
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        path = root / name
        if _STEP_DIR.match(name) and path in complete:
            return path
        if not complete:
            raise LmforgeError(f"{pointer}: names '{name}', which is not a complete checkpoint in {root}")
    return complete[-1] if complete else None


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint in `path` cannot be trusted (a missing or changed file), or None when it is intact.

    A checkpoint without checksums.json (saved by an older lmforge) is accepted unverified.
    """
    sums_path = path / CHECKSUMS_NAME
    if not (path / STATE_NAME).is_file():
        return f"{STATE_NAME} is missing"
    if not sums_path.is_file():
        return None
    try:
        sums = read_json_object(sums_path).get("sha256")
    except LmforgeError as e:
        return str(e)
    if not isinstance(sums, dict) or STATE_NAME not in sums:
        return f"{CHECKSUMS_NAME} lists no {STATE_NAME}"
    for name, digest in sums.items():
        file = path / str(name)
        if "/" in str(name) or not file.is_file():
            return f"{name} is missing"
        if file_sha256(file) != digest:
            return f"{name} does not match its sha256 in {CHECKSUMS_NAME}"
    return None


def resolve_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a resume loads and its trainer state: `latest` when intact, else (saying so on stderr) the
    newest older complete checkpoint that is; None when the run has none. Raises when every one is damaged."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST_NAME
    if not pointer.is_file():
        print(f"note: {pointer} is missing; resuming from the newest complete checkpoint, {latest.name}",
              file=sys.stderr)
    elif pointer.read_text(encoding="utf-8", errors="replace").strip() != latest.name:
        print(f"note: {pointer} does not name a complete checkpoint; resuming from the newest complete one, "
              f"{latest.name}", file=sys.stderr)
    step = int(_STEP_DIR.match(latest.name).group(1))
    candidates = [latest] + [p for p in reversed(complete_checkpoints(run_dir))
                             if int(_STEP_DIR.match(p.name).group(1)) < step]
    problems = []
    for i, path in enumerate(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, read_json_object(path / STATE_NAME)
        problems.append(f"{path.name}: {problem}")
        following = (f"falling back to {candidates[i + 1].name}" if i + 1 < len(candidates)
                     else "no older checkpoint to fall back to")
        print(f"warning: checkpoint {path} is damaged ({problem}); {following}", file=sys.stderr)
    raise LmforgeError(f"{root}: no intact checkpoint ({'; '.join(problems)}); start a new run_dir")


def write_checksums(directory: Path) -> None:
    """checksums.json: the sha256 of every file in `directory` (a checkpoint being saved), written last."""
    sums = {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUMS_NAME}
    atomic_write_json(directory / CHECKSUMS_NAME, {"sha256": sums})


class NonFiniteWeights(LmforgeError):
    """The model to be saved holds NaN or inf: the checkpoint is not written, and the previous one stays `latest`."""


def all_finite(tensors: Any) -> bool:
    """Whether every value of every tensor is finite (a sharded DTensor: this rank's shard)."""
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return False
    return True


def refuse_non_finite(run_dir: str | Path, step: int, finite: bool) -> None:
    if not finite:
        latest = latest_checkpoint(run_dir)
        kept = f"{latest.name} stays the latest checkpoint" if latest else "no checkpoint was saved yet"
        raise NonFiniteWeights(f"step {step}: the weights hold NaN or inf (training diverged), so no checkpoint "
                               f"was written ({kept}); lower train.lr or raise train.warmup_steps, then resume")


def _remove_tree(path: Path) -> None:
    """Rename to a temp name first so a half-deleted directory never looks like a checkpoint."""
    trash = path.with_name(f"{_TMP_PREFIX}del-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int) -> Path:
    """Write RUN/checkpoints/step_<step>/ atomically, point `latest` at it, keep the newest `keep` (<=0: all).

    `model` must be the plain model (not a `torch.compile` wrapper) with a `.cfg` ModelConfig.
    `state` is the caller's JSON-serializable resume state (loader position, counters).
    """
    # frozen weights (a PEFT base, possibly quantized) cannot have diverged: only what trains is checked
    refuse_non_finite(run_dir, step, all_finite(p for p in model.parameters() if p.requires_grad))
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(_TMP_PREFIX + "*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    name = checkpoint_name(step)
    tmp = temp_dir(root, f"{_TMP_PREFIX}{name}-")
    try:
        save_model_state(model, tmp)
        tensors, optim_meta = optimizer_to_files(optimizer)
        atomic_write(tmp / OPTIMIZER_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
        trainer_state = {"step": step, **state, "format": "safetensors", "optimizer": optim_meta, "rng": rng_state()}
        atomic_write_text(tmp / STATE_NAME, json.dumps(trainer_state, indent=1) + "\n")
        write_checksums(tmp)
        fsync_dir(tmp)
        return publish_checkpoint(run_dir, tmp, name, keep)
    except (OSError, SafetensorError) as e:  # a full disk, a quota, a vanished mount: one line, not a traceback
        shutil.rmtree(tmp, ignore_errors=True)
        raise LmforgeError(f"{root / name}: cannot write the checkpoint ({write_failure(e)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_failure(e: OSError | SafetensorError) -> str:
    """The OS's reason for a failed write; safetensors wraps it as '... message: "No space left on device" }'."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    found = re.search(r'message: "([^"]+)"', str(e))
    return found.group(1) if found else str(e).splitlines()[0]


def publish_checkpoint(run_dir: str | Path, tmp: Path, name: str, keep: int) -> Path:
    """Rename a complete, fsynced temp directory to `name`, then point `latest` at it and prune to the newest
    `keep`: in this order a crash at any point leaves `latest` on a whole checkpoint."""
    root = checkpoints_dir(run_dir)
    final = root / name
    if final.exists():  # re-saving a step (e.g. the final step of a finished run)
        _remove_tree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST_NAME, name + "\n")
    fsync_dir(root)
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            if old.name != name:
                _remove_tree(old)
    return final


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The trainable tensors by name when some parameters are frozen (PEFT); None when everything trains."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return None
    return {name: p.detach().contiguous() for name, p in params.items() if p.requires_grad}


def save_model_state(model: torch.nn.Module, directory: Path) -> None:
    """A full model directory, or config.json + trainable.safetensors when some parameters are frozen."""
    state = trainable_state(model)
    if state is None:
        save_model(model, directory)  # each file written and fsynced atomically
        return
    atomic_write(directory / TRAINABLE_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_NAME, {"model": to_dict(model.cfg), "trainable_only": True})


def load_model_state(path: Path, model: torch.nn.Module) -> None:
    """Inverse of `save_model_state`: a trainable-only checkpoint must name exactly this run's trainable tensors."""
    if not (path / TRAINABLE_NAME).is_file():
        load_into(model, load_weights(path / WEIGHTS_NAME), str(path / WEIGHTS_NAME))
        return
    source = path / TRAINABLE_NAME
    saved, own = load_weights(source), trainable_state(model) or {}
    if set(saved) != set(own):
        missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        raise LmforgeError(f"{source}: trainable tensors differ from this run's (missing {missing[:3]}, "
                           f"unexpected {extra[:3]}); resume with the same peft config")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            if value.shape != own[name].shape:
                raise LmforgeError(f"{source}: tensor '{name}' has shape {tuple(value.shape)}, this run has "
                                   f"{tuple(own[name].shape)}")
            params[name].copy_(value)


def check_model_config(checkpoint: Path, model: torch.nn.Module) -> None:
    """Raise one line naming the first model config key that differs from the checkpoint's."""
    saved = to_dict(read_model_config(checkpoint))
    current = to_dict(model.cfg)
    for key in current:
        if key != "preset" and saved.get(key) != current[key]:
            raise LmforgeError(f"{checkpoint / CONFIG_NAME}: checkpoint has model.{key}={saved.get(key)!r} "
                               f"but this run has model.{key}={current[key]!r}; use the original config "
                               "or a new run_dir")


def load_checkpoint(run_dir: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """Restore model, optimizer and RNG from the checkpoint `resolve_checkpoint` picks (`latest`, verified);
    return the saved state, or None if there is none."""
    found = resolve_checkpoint(run_dir)
    if found is None:
        return None
    return load_checkpoint_at(*found, model, optimizer)


def load_checkpoint_at(path: Path, state: dict[str, Any], model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """`load_checkpoint` of the safetensors checkpoint in `path`, whose trainer state is `state`."""
    if state.get("format", "safetensors") != "safetensors":
        raise LmforgeError(f"{path} is a distributed checkpoint (format {state.get('format')!r} in {STATE_NAME}); "
                           "resume it with the parallel settings it was saved with")
    if "format" not in state and not (path / WEIGHTS_NAME).is_file() and not (path / TRAINABLE_NAME).is_file():
        raise LmforgeError(f"{path}: no safetensors weights, and {STATE_NAME} records no format (a distributed "
                           "checkpoint of an older lmforge?); its pickled .metadata is not loaded: start a new "
                           "run_dir, or resume with the lmforge that saved it")
    check_model_config(path, model)
    load_model_state(path, model)
    missing = [key for key in ("step", "optimizer", "rng") if key not in state]
    if missing:
        raise LmforgeError(f"{path / STATE_NAME}: no '{missing[0]}' entry; the checkpoint is incomplete or "
                           "was not written by lmforge")
    if optimizer is not None:
        if not isinstance(state.get("optimizer"), dict):
            raise LmforgeError(f"{path / STATE_NAME}: no 'optimizer' state; the checkpoint is incomplete")
        sd = optimizer_from_files(load_weights(path / OPTIMIZER_NAME), state["optimizer"])
        sizes = [len(g["params"]) for g in sd["param_groups"]]
        if sizes != [len(g["params"]) for g in optimizer.param_groups]:
            raise LmforgeError(f"{path / OPTIMIZER_NAME}: optimizer parameter groups {sizes} do not match "
                               "this model's")
        optimizer.load_state_dict(sd)
    set_rng_state(state["rng"])
    return state
