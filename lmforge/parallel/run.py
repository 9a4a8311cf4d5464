"""One training process's view of a distributed run: what `train_loop` asks of it, in one object.

`setup_parallel` joins the process group torchrun describes and builds the device mesh
(pipeline x data-parallel x tensor-parallel, and an expert-parallel mesh for MoE); `DistributedRun.prepare`
applies the plans to a plain model from outside (the pipeline split, then TP or expert sharding, then activation
checkpointing, then DDP or FSDP2); the rest keeps the loop's bookkeeping global: mean loss over data-parallel
ranks, expert-shard gradients over their replicas, DCP checkpoints, one full model directory written by rank 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.checkpoint.dcp import load_dcp_checkpoint, save_dcp_checkpoint
from lmforge.core.errors import ConfigError
from lmforge.model.encdec import build_model
from lmforge.model.io import save_model
from lmforge.parallel.checkpointing import apply_activation_checkpointing, transformer_blocks
from lmforge.parallel.config import ParallelConfig
from lmforge.parallel.expert import apply_expert_parallel, expert_load_metrics, expert_mesh, sync_expert_grads
from lmforge.parallel.launch import init_process_group, local_device, under_torchrun
from lmforge.parallel.pipeline import PipelineRunner, full_local_state, gather_to_main, split_model
from lmforge.parallel.tp import TensorParallelLayout, apply_tensor_parallel

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class QuietMetrics:
    """What ranks other than 0 log to: nothing (rank 0 writes metrics.jsonl, TensorBoard and plots)."""

    def log(self, row: dict[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[choice]


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that lets losses reach the wrapped model's attributes (e.g. `model.lm_head.weight`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


@dataclass
class DistributedRun:
    cfg: ParallelConfig
    device: torch.device
    rank: int
    world_size: int
    dp_size: int
    dp_rank: int
    mesh: Any  # DeviceMesh with dims ("dp",), ("dp", "tp"), ("pp", "dp") or ("pp", "dp", "tp")
    owns_group: bool = False
    layout: TensorParallelLayout | None = None
    pipeline: PipelineRunner | None = None  # set by `prepare` when parallel.pipeline > 1

    @property
    def pipelined(self) -> bool:
        return self.cfg.pipeline > 1

    @property
    def pp_group(self) -> Any:
        """The pipeline's process group (None without pipeline parallelism)."""
        return self.mesh.get_group("pp") if self.pipelined else None
    ep_mesh: Any = None  # ("edp", "ep") mesh when parallel.expert > 1 (lmforge.parallel.expert)
    _model: nn.Module | None = None  # the prepared model (expert-parallel metrics read it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_group(self) -> Any:
        return self.mesh.get_group("dp")

    # ------------------------------------------------------------------------------------------
    # plans

    def prepare(self, model: nn.Module) -> nn.Module:
        """Shard/wrap `model` (already on self.device) in place; returns the module to call forward on.

        With pipeline parallelism it returns this process's `StageModule` instead (what the optimizer and
        checkpoints see; the stages themselves run through `self.pipeline`)."""

        cfg = self.cfg
        if cfg.pipeline > 1:
            return self._prepare_pipeline(model)
        if cfg.tensor > 1:
            self.layout = apply_tensor_parallel(model, self.mesh["tp"])
        ignore = apply_expert_parallel(model, self.ep_mesh) if self.ep_mesh is not None else []
        if ignore:  # DDP leaves the expert shards alone; sync_grads reduces them over their replicas
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        self._model = model
        n_ac = apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.ac_every)
        wrapped = self._data_parallel(model, transformer_blocks(model))
        if self.is_main:
            ac = f", activation checkpointing on {n_ac} blocks" if n_ac else ""
            ep = f", expert={cfg.expert}" if cfg.expert > 1 else ""
            print(f"parallel: {self.world_size} processes, data={cfg.data} x {self.dp_size}, tensor={cfg.tensor}"
                  f"{ep}{ac}, {dist.get_backend()} on {self.device}", file=sys.stderr)
        return wrapped

    def _prepare_pipeline(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        P, V = cfg.pipeline, cfg.stages_per_rank
        pp_rank = self.mesh["pp"].get_local_rank()
        stage_ids = [pp_rank + v * P for v in range(V)]  # interleaved: stage r and r + P on rank r
        local, chunks = split_model(model, P * V, stage_ids)
        if cfg.tensor > 1:
            self.layout = apply_tensor_parallel(local, self.mesh["tp"])
        n_ac = apply_activation_checkpointing(local, cfg.activation_checkpointing, cfg.ac_every)
        wrapped = [self._data_parallel(chunk, transformer_blocks(chunk)) for chunk in chunks]
        self.pipeline = PipelineRunner(cfg, local, wrapped, stage_ids, P * V, self.device, self.pp_group)
        if self.is_main:
            ac = f", activation checkpointing on {n_ac} blocks" if n_ac else ""
            print(f"parallel: {self.world_size} processes, pipeline={P} x {V} stage(s) each "
                  f"({cfg.pipeline_schedule}, {cfg.n_microbatches} micro-batches), data={cfg.data} x "
                  f"{self.dp_size}, tensor={cfg.tensor}{ac}, {dist.get_backend()} on {self.device}", file=sys.stderr)
        return local

    def _data_parallel(self, model: nn.Module, blocks: list[nn.Module]) -> nn.Module:
        cfg = self.cfg
        if cfg.data == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=resolve_dtype(cfg.param_dtype, self.device),
                                      reduce_dtype=resolve_dtype(cfg.reduce_dtype, self.device))
            mesh = self.mesh["dp"]
            for block in blocks:
                fully_shard(block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=mp)
            # The root group (embeddings, final norm, LM head) stays gathered after forward: the loss reads
            # lm_head.weight right after it (fused cross-entropy), and backward needs it at once anyway.
            fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
            return model
        if cfg.data == "ddp":
            bf16 = resolve_dtype(cfg.reduce_dtype, self.device) == torch.bfloat16
            if bf16 and self.device.type != "cuda":
                raise ConfigError("parallel.reduce_dtype=bf16 with parallel.data=ddp needs CUDA (NCCL's bf16 "
                                  "all-reduce); use fp32 on CPU, or parallel.data=fsdp")
            # No find_unused_parameters for MoE: experts are stacked tensors that every forward uses (idle experts
            # get zero rows), and the unused-parameter scan marks lm_head ready at the end of forward, before
            # the loss reads it (fused cross-entropy), so its backward hook would fire twice. A module that holds
            # parameters no loss reads (a reward model's LM head) says so with `unused_parameters`.
            ddp = _DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                       process_group=self.dp_group,  # the replicas of this pipeline stage
                       find_unused_parameters=getattr(model, "unused_parameters", False))
            if bf16:
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                ddp.register_comm_hook(self.dp_group, default_hooks.bf16_compress_hook)
            return ddp
        return model

    def adapt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Tensor and expert parallelism leave some parameters plain (embeddings, norms) beside DTensors, or on
        another mesh under FSDP x TP; the fused and multi-tensor (foreach) kernels need one kind, so step per tensor."""
        if self.cfg.tensor > 1 or self.cfg.expert > 1:
            for group in optimizer.param_groups:
                if "fused" in group:
                    group["fused"] = False
                if "foreach" in group:
                    group["foreach"] = False

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[nn.Module]:
        """Under FSDP: every parameter of `model` gathered whole on each rank for the block, so ranks may run
        different numbers of forward passes (sampling each its own prompts, stopping at different lengths) and
        call a submodule directly (a policy inside a wrapper) with no collective in between; sharded again
        after. Costs one full copy of the parameters per rank while it lasts. Other layouts: a no-op."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if not units:
            yield model
            return
        if isinstance(model, FSDPModule):
            model._get_fsdp_state()._lazy_init()  # the root must be known before a submodule runs alone
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield model
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(unit is not model and self.cfg.reshard_after_forward, recurse=False)

    # ------------------------------------------------------------------------------------------
    # bookkeeping

    def sync_grads(self) -> None:
        """After a step's backward: reduce what DDP/FSDP do not (expert shards over their replicas)."""
        if self.ep_mesh is not None and self._model is not None:
            sync_expert_grads(self._model, self.ep_mesh, self.world_size)

    def reduce_stats(self, stats: Any) -> Any:
        """Global step statistics: loss and metrics averaged over data-parallel ranks, tokens summed.

        Ranks hold equal-sized slices of the global batch, so the mean of their means is the global mean.
        """
        keys = sorted(stats.metrics)
        t = torch.tensor([stats.loss, float(stats.tokens), *(stats.metrics[k] for k in keys)], dtype=torch.float64)
        dist.all_reduce(t, group=self.dp_group)
        values = (t / self.dp_size).tolist()
        metrics = dict(zip(keys, values[2:]))
        if self.ep_mesh is not None and self._model is not None:  # per-rank expert load (the same on every rank)
            metrics.update(expert_load_metrics(self._model, self.ep_mesh))
        return dataclasses.replace(stats, loss=values[0], tokens=int(round(t[1].item())), metrics=metrics)

    def save_checkpoint(self, run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], keep: int) -> Path:

        layout = {"world_size": self.world_size, "tensor": self.cfg.tensor}
        if self.pipelined:  # for the record: DCP names are the whole model's, so any layout resumes it
            layout["pipeline"] = self.cfg.pipeline
        if self.cfg.expert > 1:
            layout["expert"] = self.cfg.expert
        state = {**state, "parallel": layout}
        return save_dcp_checkpoint(run_dir, step, model, optimizer, state, keep, model.cfg)

    def load_checkpoint(self, run_dir: str | Path, model: nn.Module,
                        optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:

        return load_dcp_checkpoint(run_dir, model, optimizer, self.cfg.tensor)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Collective: every parameter gathered whole, in the model's own layout; non-empty on rank 0 only.

        Under pipeline parallelism every process's stages are gathered (whatever `model` is)."""
        if self.pipeline is not None:  # each process restores its own blocks' rows, rank 0 merges
            state = full_local_state(self.pipeline.local)
            return gather_to_main(self.layout.unpermute(state) if self.layout is not None else state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.layout is not None:
            state = self.layout.unpermute(state)
        return state

    def save_model(self, model: nn.Module, directory: str | Path) -> Path:
        """Collective: rank 0 writes a plain model directory (the same files a 1-process run writes).
        Under pipeline parallelism `model` may be the whole model or this process's `StageModule`."""

        state = self.full_state_dict(model)
        if self.is_main:
            plain = build_model(model.cfg)
            plain.load_state_dict(state)
            save_model(plain, directory)
        dist.barrier()
        return Path(directory)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_parallel(cfg: ParallelConfig, device_name: str = "auto", log_dir: str | Path | None = None
                   ) -> DistributedRun | None:
    """Join torchrun's process group and build the mesh; None for a plain single-process run.

    Ranks other than 0 send stdout and stderr to LOG_DIR/rank_<r>.log (or nowhere without a log_dir), so the
    console shows one run; a crashing rank's traceback stays in its log and the launcher names the rank.
    """
    world = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1
    if not cfg.enabled:
        if world > 1:
            raise ConfigError(f"{world} processes were launched but parallel.data is 'none'; set "
                              "--parallel.data ddp or fsdp (or parallel.tensor > 1)")
        return None
    device = local_device(device_name)
    owns = init_process_group(cfg.backend, device)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (cfg.tensor * cfg.pipeline):
        raise ConfigError(f"parallel.pipeline={cfg.pipeline} x parallel.tensor={cfg.tensor} must divide the number "
                          f"of processes ({world})")
    ep_mesh = expert_mesh(world, cfg.expert, device.type) if cfg.expert > 1 else None
    from torch.distributed.device_mesh import init_device_mesh

    dp = world // (cfg.tensor * cfg.pipeline)
    if dp > 1 and cfg.data == "none" and cfg.pipeline > 1:
        raise ConfigError(f"{world} processes with parallel.pipeline={cfg.pipeline} x parallel.tensor={cfg.tensor} "
                          f"leave {dp} data-parallel replicas but parallel.data is 'none'; set ddp or fsdp")
    sizes = [("pp", cfg.pipeline), ("dp", dp), ("tp", cfg.tensor)]
    sizes = [(name, n) for name, n in sizes if n > 1 or name == "dp"]
    mesh = init_device_mesh(device.type, tuple(n for _, n in sizes), mesh_dim_names=tuple(name for name, _ in sizes))
    if rank != 0:
        _quiet(rank, log_dir)
    return DistributedRun(cfg, device, rank, world, dp, mesh["dp"].get_local_rank(), mesh, owns, ep_mesh=ep_mesh)


def data_slice(global_batch: int, run: DistributedRun | None) -> dict[str, int]:
    """SequenceLoader arguments for this rank: data.batch_size is the GLOBAL micro-batch, split evenly over the
    data-parallel ranks (tensor-parallel peers share a slice), so N processes see what 1 process sees."""
    if run is None:
        return {"batch_size": global_batch}
    if global_batch % run.dp_size:
        raise ConfigError(f"data.batch_size={global_batch} (the global micro-batch) must be divisible by the "
                          f"{run.dp_size} data-parallel ranks")
    return {"batch_size": global_batch // run.dp_size, "rank": run.dp_rank, "world_size": run.dp_size}


def _quiet(rank: int, log_dir: str | Path | None) -> None:
    if log_dir is None:
        target = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    else:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        target = open(Path(log_dir) / f"rank_{rank}.log", "a", buffering=1)  # noqa: SIM115
    sys.stdout = sys.stderr = target
