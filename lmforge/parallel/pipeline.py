"""Pipeline parallelism (GPipe, Huang et al. 2019; 1F1B, Narayanan et al. 2021) on `torch.distributed.pipelining`.

The Transformer is cut at block boundaries into P x V stages (V = 2 virtual stages per process for interleaved
1F1B): the first stage holds the embedding, the last the final norm and the LM head, the loss runs on the last.
Stages are built from outside the model: a `StageModule` borrows the model's own submodules under their own
names (`blocks` is a ModuleDict keyed by the original layer index), so every parameter keeps the fully-qualified
name it has in the unsplit model and DCP checkpoints load on any other layout.

Each process keeps one `StageModule` holding everything it owns (what the optimizer, grad clipping and
checkpoints see) and one per stage it runs (what `PipelineStage` calls). The library's schedule runs forward
and backward itself over `parallel.microbatches` micro-batches; `PipelineRunner.forward_backward` hands it one
optimizer step and returns the step's mean loss on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.core.config import require
from lmforge.core.errors import ConfigError
from lmforge.core.runtime import autocast
from lmforge.model.attention import self_attention_mask
from lmforge.model.transformer import Transformer
from lmforge.parallel.config import ParallelConfig

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved-1f1b": "ScheduleInterleaved1F1B"}


def check_pipelinable(model: nn.Module, n_stages: int) -> None:
    """One-line errors for models the stage split does not cover yet (never a silently different model)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not isinstance(getattr(model, "blocks", None), nn.ModuleList):
        raise ConfigError("parallel.pipeline > 1 needs lmforge's decoder Transformer (a model with .cfg and .blocks)")
    unsupported = [("model.arch", cfg.arch != "decoder", "encoder-decoder models"),
                   ("model.tie_embeddings", cfg.tie_embeddings, "tied embeddings (the embedding lives on the first "
                    "stage, the head on the last)"),
                   ("model.moe_experts", bool(cfg.moe_experts), "MoE layers (their balance losses and router "
                    "updates span stages)"),
                   ("model.mtp_depth", bool(cfg.mtp_depth), "multi-token prediction"),
                   ("model.position", cfg.position == "t5", "T5 relative position bias (shared by all layers)"),
                   ("model.prefix_lm", cfg.prefix_lm, "prefix LMs (the stages see no prefix lengths)"),
                   ("peft", getattr(model, "virtual_tokens", None) is not None, "prompt or prefix tuning")]
    for key, bad, what in unsupported:
        if bad:
            raise ConfigError(f"{key}: parallel.pipeline > 1 does not support {what} yet")
    require(cfg.n_layers % n_stages == 0, "model.n_layers", cfg.n_layers,
            f"divisible by the {n_stages} pipeline stages (parallel.pipeline x stages per process)")


def stage_layers(n_layers: int, n_stages: int, stage: int) -> range:
    """The blocks of `stage` (contiguous, equal counts)."""
    per = n_layers // n_stages
    return range(stage * per, (stage + 1) * per)


class StageModule(nn.Module):
    """Some of a Transformer's blocks (and the embedding / final norm and head, on the first / last stage),
    under the parameter names they have in the whole model. forward(ids or hidden) -> hidden; the last stage
    returns the final-norm hidden states `Transformer.forward(..., return_hidden=True)` returns."""

    def __init__(self, model: nn.Module, layers: Iterable[int], first: bool, last: bool) -> None:
        super().__init__()
        self.cfg, self.first, self.last = model.cfg, first, last
        if first:
            self.embed = model.embed
            self.embed_dropout = model.embed_dropout
            if self.cfg.position == "learned":
                self.pos_embed = model.pos_embed
            elif self.cfg.position == "sinusoidal":
                self.register_buffer("pos_table", model.pos_table, persistent=False)
        self.rope = model.rope
        if self.cfg.position == "alibi":
            self.register_buffer("alibi", model.alibi, persistent=False)
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        if last:
            self.norm = model.norm
            self.lm_head = model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        positions = torch.arange(T, device=x.device)
        if self.first:  # the stage holds the model's embedding modules under their names: the model's own code
            x = Transformer.add_positions(self, self.embed(x), positions)
        rope = self.rope(positions) if self.rope is not None else None
        mask = self_attention_mask(self.cfg, T, 0, x.dtype, x.device, alibi=getattr(self, "alibi", None))
        for block in self.blocks.values():
            x = block(x, rope, None, 0, mask)
        if not self.last:
            return x
        x = self.norm(x)
        return x * self.cfg.output_scale if self.cfg.output_scale != 1.0 else x


class _LastStage:
    """What a train_loop `loss_fn(model, (inputs, targets))` sees on the last stage: calling it returns the
    stage's output (the hidden states it was given as inputs), `lm_head` is the model's head."""

    def __init__(self, stage: StageModule) -> None:
        self.lm_head = stage.lm_head
        self.cfg = stage.cfg

    def __call__(self, hidden: torch.Tensor, return_hidden: bool = False) -> torch.Tensor:
        return hidden if return_hidden else self.lm_head(hidden)


def split_model(model: nn.Module, n_stages: int, stage_ids: list[int]) -> tuple[StageModule, list[StageModule]]:
    """(everything this process owns, one module per stage it runs) for `stage_ids` out of `n_stages`."""
    check_pipelinable(model, n_stages)
    n = model.cfg.n_layers
    chunks = [StageModule(model, stage_layers(n, n_stages, s), s == 0, s == n_stages - 1) for s in stage_ids]
    owned = [i for s in stage_ids for i in stage_layers(n, n_stages, s)]
    local = StageModule(model, owned, 0 in stage_ids, n_stages - 1 in stage_ids)
    return local, chunks


class PipelineRunner:
    """This process's stages and the schedule that drives them; `forward_backward` is one optimizer step's
    forward and backward (the schedule runs backward itself)."""

    def __init__(self, cfg: ParallelConfig, local: StageModule, chunks: list[nn.Module], stage_ids: list[int],
                 n_stages: int, device: torch.device, group: Any) -> None:
        import torch.distributed.pipelining as pipelining

        self.cfg, self.local, self.device, self.group = cfg, local, device, group
        self.n_microbatches = cfg.n_microbatches
        self.stages = [pipelining.PipelineStage(chunk, s, n_stages, device, group=group)
                       for chunk, s in zip(chunks, stage_ids)]
        self.has_first, self.has_last = 0 in stage_ids, n_stages - 1 in stage_ids
        self.last_module = local if self.has_last else None
        self.last_rank = dist.get_world_size(group) - 1  # the last stage's rank in the pp group
        schedule = getattr(pipelining, SCHEDULES[cfg.pipeline_schedule])
        stage_arg = self.stages if cfg.stages_per_rank > 1 else self.stages[0]
        # scale_grads=False: the loss is divided by micro-batches x accumulation steps before backward, so
        # gradients accumulated over several `step` calls stay a mean (the library's scaling would divide the
        # earlier steps' gradients again).
        self.schedule = schedule(stage_arg, self.n_microbatches, loss_fn=self._loss, scale_grads=False)
        self._loss_fn: Callable | None = None
        self._scale = 1.0
        self._records: list[tuple[float, dict[str, float]]] = []  # (loss, metrics) of each loss_fn call
        self.busy_s = 0.0  # seconds in stage forward/backward (`measure_busy_time`), for the bubble benchmark

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss, extra = self._loss_fn(_LastStage(self.last_module), (output, target))
        self._records.append((float(loss.detach()), {k: float(v) for k, v in extra.items()}))
        return loss * self._scale

    def forward_backward(self, loss_fn: Callable, batches: Any, grad_accum: int, precision: str,
                         count_tokens: Callable[[Any], int]) -> tuple[float, dict[str, float], int]:
        """Gradients of mean(loss over grad_accum batches x micro-batches) into `.grad`; returns (mean loss,
        mean metrics, tokens) on every rank of the pipeline (the loss comes from the last stage)."""
        self._loss_fn, self._scale = loss_fn, 1.0 / (grad_accum * self.n_microbatches)
        records: list[tuple[float, dict[str, float]]] = []
        tokens = 0
        for _ in range(grad_accum):
            batch = batches.next_batch()  # every stage reads the batch: loaders stay in step for checkpoints
            tokens += count_tokens(batch)
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ConfigError("parallel.pipeline > 1 needs (inputs, targets) batches (the causal LM objective)")
            inputs, targets = (t.to(self.device, non_blocking=True) for t in batch)
            if inputs.shape[0] % self.n_microbatches:
                raise ConfigError(f"data.batch_size: each data-parallel rank's batch of {inputs.shape[0]} sequences "
                                  f"must be divisible by parallel.microbatches={self.n_microbatches}")
            args = (inputs,) if self.has_first else ()
            kwargs = {"target": targets} if self.has_last else {}
            self._records = []
            with autocast(self.device, precision):
                self.schedule.step(*args, return_outputs=False, **kwargs)
            # the first step also calls the loss once to infer shapes: the micro-batches' calls are the last M
            records += self._records[-self.n_microbatches:] if self.has_last else []
        n = len(records)
        metrics: dict[str, float] = {}
        for _, extra in records:
            for k, v in extra.items():
                metrics[k] = metrics.get(k, 0.0) + v / n
        result = [sum(loss for loss, _ in records) / n if n else 0.0, metrics]
        dist.broadcast_object_list(result, group=self.group, group_src=self.last_rank)
        return result[0], result[1], tokens

    def measure_busy_time(self) -> None:
        """Count the seconds each stage spends computing (forward and backward of its micro-batches, the loss
        included) in `busy_s`; the rest of a step is waiting for peers: the pipeline bubble."""
        for stage in self.stages:
            for name in ("forward_one_chunk", "backward_one_chunk"):
                setattr(stage, name, self._timed(getattr(stage, name)))

    def _timed(self, fn: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.busy_s += time.perf_counter() - t0
        return run


def theoretical_bubble(stages: int, microbatches: int, virtual: int = 1) -> float:
    """Idle fraction of a GPipe/1F1B step, (P-1)/(M+P-1); interleaving V stages per process divides the
    warm-up and drain by V: (P-1)/(V*M+P-1) (Narayanan et al. 2021, section 2.2)."""
    return (stages - 1) / (virtual * microbatches + stages - 1)


def full_local_state(local: nn.Module) -> dict[str, torch.Tensor]:
    """Collective within a stage: this process's parameters whole on the CPU (sharded DTensors gathered)."""
    return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()
            for name, t in local.state_dict().items()}


def gather_to_main(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collective: every process's `state` merged on rank 0 ({} elsewhere). Pickled only between this run's own
    processes (gather_object), never read from a file."""
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(state, parts, dst=0)
    merged: dict[str, torch.Tensor] = {}
    for part in parts or []:
        merged.update(part)
    return merged
