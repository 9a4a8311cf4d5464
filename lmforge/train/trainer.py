"""The training loop every stage shares (`lmforge.train.pretrain` feeds it token shards and the LM loss).

`train_loop` knows nothing of what it trains: it takes a model, `loss_fn(model, batch) -> (loss,
metrics)` and a batch source with next_batch()/state_dict()/load_state_dict(). It owns the rest:
AdamW + warmup with cosine or WSD lr, gradient accumulation and clipping, mixed precision, periodic evaluation,
metrics, plots, and atomic checkpoints that resume bit for bit. SFT, DPO and GRPO reuse it with
their own loss and batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lmforge.checkpoint.dcp import load_any_checkpoint
from lmforge.checkpoint.store import STATE_NAME, checkpoint_name, checkpoints_dir, latest_checkpoint, save_checkpoint
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.files import dir_lock
from lmforge.core.runtime import autocast, compile_model, resolve_device, resolve_precision
from lmforge.parallel.grad import clip_grad_norm
from lmforge.parallel.run import DistributedRun, QuietMetrics
from lmforge.train.config import Batches, Evaluate, LossFn, StepEnd, TrainConfig
from lmforge.train.metrics import METRICS_NAME, PLOT_NAME, MetricsLogger, plot_curves
from lmforge.train.optim import build_optimizer
from lmforge.train.ramp import ramp_from_config
from lmforge.train.schedule import lr_at, resolve_warmup
from lmforge.train.stability import SpikeGuard, input_embedding, shrink_embedding_gradient

# ----------------------------------------------------------------------------------------------
# config


# ----------------------------------------------------------------------------------------------
# one optimizer step


def tokens_in(batch: Any) -> int:
    """Tokens in a batch: the input tensor's size (first element of a tuple, or 'input_ids')."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].numel()
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"].numel()
    return 0


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


@dataclass
class StepStats:
    loss: float  # mean of the micro-batch losses
    metrics: dict[str, float]  # loss_fn's extra metrics, averaged over micro-batches
    tokens: int


def forward_backward(model: nn.Module, loss_fn: LossFn, batches: Batches, grad_accum: int,
                     device: torch.device, precision: str, scaler: torch.amp.GradScaler | None = None,
                     count_tokens: Callable[[Any], int] = tokens_in) -> StepStats:
    """Accumulate gradients of mean(loss over `grad_accum` micro-batches) into `.grad`.

    Each micro-batch loss is divided by grad_accum, so with equal-sized micro-batches the gradient
    equals that of one batch grad_accum times larger. Backward runs outside autocast, as PyTorch's
    AMP recipe prescribes.
    """
    total = torch.zeros((), device=device)
    sums: dict[str, float] = {}
    tokens = 0
    for _ in range(grad_accum):
        batch = batches.next_batch()
        tokens += count_tokens(batch)
        batch = to_device(batch, device)
        with autocast(device, precision):
            loss, extra = loss_fn(model, batch)
        scaled = loss / grad_accum
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach().float()
        for k, v in extra.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return StepStats(total.item() / grad_accum, {k: v / grad_accum for k, v in sums.items()}, tokens)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                   scaler: torch.amp.GradScaler | None = None, norm_group: Any = None) -> float:
    """Clip the global grad norm (unscaled first under fp16), step, zero grads; returns the pre-clip norm.

    A non-finite norm (a NaN or inf gradient, even with a finite loss) skips the update: the weights and the
    optimizer state stay as they were (under fp16 the GradScaler does the same and lowers its scale).
    `norm_group`: the pipeline's process group, whose other stages hold the rest of the gradients.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    norm = clip_grad_norm(model.parameters(), max_norm, norm_group)  # also sharded (DTensor) gradients
    if scaler is None and not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return norm
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when the fp16 gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


# ----------------------------------------------------------------------------------------------
# the loop


@dataclass
class LoopState:
    """Counters that survive a resume (saved in trainer_state.json under "loop")."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    skipped_steps: int = 0  # steps whose gradient was not finite: their update was skipped
    skipped_in_a_row: int = 0
    train_time: float = 0.0  # seconds spent in training steps (not eval or checkpointing)
    last_loss: float | None = None
    last_eval: dict[str, Any] | None = None
    window: dict[str, float] = field(default_factory=dict)  # sums since the last metrics row
    latest: dict[str, float] = field(default_factory=dict)  # on_step_end hooks' values since the last row

    def add_to_window(self, stats: StepStats, grad_norm: float, seconds: float) -> None:
        w = self.window
        for k, v in {"steps": 1, "loss": stats.loss, "grad_norm": grad_norm, "tokens": stats.tokens,
                     "time": seconds, **{f"m.{k}": v for k, v in stats.metrics.items()}}.items():
            w[k] = w.get(k, 0.0) + v

    def pop_window_row(self, lr: float) -> dict[str, Any]:
        w, self.window = self.window, {}
        n = w["steps"]
        row = {"step": self.step, "loss": w["loss"] / n, "lr": lr, "grad_norm": w["grad_norm"] / n,
               "tokens_seen": self.tokens_seen, "tokens_per_s": w["tokens"] / w["time"] if w["time"] else 0.0}
        row.update({k[2:]: v / n for k, v in w.items() if k.startswith("m.")})
        if self.skipped_steps:
            row["skipped_steps"] = self.skipped_steps
        row.update(self.latest)
        self.latest = {}
        return row


MAX_SKIPPED_IN_A_ROW = 10  # consecutive non-finite gradients that stop the run


def train_loop(model: nn.Module, loss_fn: LossFn, batches: Batches, cfg: TrainConfig, run_dir: str | Path, *,
               evaluate: Evaluate | None = None, resume: bool = False,
               count_tokens: Callable[[Any], int] = tokens_in, desc: str = "train",
               on_step_end: list[StepEnd] | None = None, parallel: DistributedRun | None = None,
               fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `model` for cfg.steps optimizer steps; checkpoints, metrics.jsonl, tb/, loss.png go in run_dir.

    `model` must be the plain module with a `.cfg` (checkpoints are model directories); it is moved
    to the device and trained in place. `evaluate(model) -> {"val_loss": ..., ...}` runs every
    cfg.eval_every steps and at the end. With `resume`, model, optimizer, loader, RNG and counters
    come back from RUN/checkpoints/latest, so the rest of the run repeats an uninterrupted one.
    `on_step_end` hooks run after each optimizer step as hook(model, step) (e.g. MoE router-bias
    updates, data-mixture bookkeeping); the next metrics row shows the latest value of each metric they
    return (running totals stay exact; loss_fn metrics, by contrast, are averaged over the row's steps).
    `fixed`: settings a resume must not change ({"data.batch_size": 16, ...}: the loader position means nothing
    under another batch geometry); saved with each checkpoint, and a resume that differs is refused naming the key.
    A step whose gradient is not finite is skipped (counted as `skipped_steps` in metrics.jsonl); after
    MAX_SKIPPED_IN_A_ROW in a row the run stops. The run directory is locked (`dir_lock`) while the loop runs.
    Under pipeline parallelism (parallel.cfg.pipeline > 1) each process trains only its own stages of `model`
    (`DistributedRun.save_model` gathers the rest): the library's schedule runs forward and backward itself over
    the micro-batches, calling `loss_fn` on the last stage with a model whose call returns the final hidden
    states and whose `lm_head` is the model's, so an LM loss of (inputs, targets) batches works unchanged;
    `evaluate`, fp16 and compile are refused there.
    Returns {"steps", "final_loss", "tokens_seen", "tokens_per_s", **last evaluation}.
    """
    main = parallel is None or parallel.is_main
    with dir_lock(run_dir) if main else contextlib.nullcontext():
        return _train_loop(model, loss_fn, batches, cfg, Path(run_dir), evaluate, resume, count_tokens, desc,
                           on_step_end, parallel, fixed or {})


def check_pipeline_loop(cfg: TrainConfig, precision: str, evaluate: Evaluate | None) -> None:
    """What the loop cannot do yet under pipeline parallelism: one line each, never a silent skip."""
    if precision == "fp16":
        raise ConfigError("train.precision=fp16 with parallel.pipeline > 1: the schedule's backward bypasses the "
                          "loss scaler; use bf16 or fp32")
    if cfg.compile:
        raise ConfigError("train.compile with parallel.pipeline > 1 is not supported yet; set train.compile false")
    if evaluate is not None:
        raise ConfigError("evaluation with parallel.pipeline > 1 is not supported yet (no stage holds the whole "
                          "model); evaluate the saved model afterwards")


def check_fixed(saved: dict[str, Any], fixed: dict[str, Any], where: Path) -> None:
    """Refuse a resume whose `fixed` settings differ from those the checkpoint was saved with."""
    before = saved.get("fixed") or {}
    for key, value in fixed.items():
        if key in before and before[key] != value:
            raise LmforgeError(f"{where}: the run was saved with {key}={before[key]!r}, this resume has "
                               f"{key}={value!r}; the saved data position is only valid with the original value "
                               "(set it back, or start a new run_dir)")


def _train_loop(model: nn.Module, loss_fn: LossFn, batches: Batches, cfg: TrainConfig, run_dir: Path,
                evaluate: Evaluate | None, resume: bool, count_tokens: Callable[[Any], int], desc: str,
                on_step_end: list[StepEnd] | None, parallel: DistributedRun | None,
                fixed: dict[str, Any]) -> dict[str, Any]:
    device = resolve_device(cfg.device) if parallel is None else parallel.device
    main = parallel is None or parallel.is_main  # only rank 0 writes metrics, plots and progress
    load_ckpt, save_ckpt = ((load_any_checkpoint, save_checkpoint) if parallel is None
                            else (parallel.load_checkpoint, parallel.save_checkpoint))
    precision = resolve_precision(cfg.precision, device)
    model.to(device).train()
    pipelined = parallel is not None and parallel.pipelined
    if pipelined:
        check_pipeline_loop(cfg, precision, evaluate)
        model = forward_model = parallel.prepare(model)  # this process's stages, under the whole model's names
    else:
        forward_model = model if parallel is None else parallel.prepare(model)  # shards before the optimizer
    optimizer = build_optimizer(model, cfg)
    if parallel is not None:
        parallel.adapt_optimizer(optimizer)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    state = LoopState()
    saved = None
    if resume:
        saved = load_ckpt(run_dir, model, optimizer)
        if saved is None:
            print(f"note: no checkpoint in {run_dir}; starting a fresh run", file=sys.stderr)
    elif latest_checkpoint(run_dir) is not None:
        raise LmforgeError(f"{run_dir} already holds checkpoints; pass --resume true to continue that run, "
                           "or choose another run_dir")
    if saved is not None:
        check_fixed(saved, fixed, checkpoints_dir(run_dir) / checkpoint_name(saved["step"]) / STATE_NAME)
        state = LoopState(**saved["loop"])
        batches.load_state_dict(saved["loader"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        if main:
            print(f"resuming {run_dir} from step {state.step}", file=sys.stderr)
    metrics = (MetricsLogger(run_dir, resume_step=state.step if saved is not None else None) if main
               else QuietMetrics())
    ramp = ramp_from_config(cfg, batches, count_tokens)
    spike = cfg.spike
    guard = None if spike.k == 0 else SpikeGuard(run_dir, spike.k, spike.window, spike.warmup, spike.skip_batches,
                                                spike.max_rollbacks, load_ckpt, main)
    if guard is not None and saved is not None:
        guard.detector.load_state_dict(saved.get("spike_window") or {})
    shrink = (shrink_embedding_gradient(input_embedding(model), cfg.embed_grad_alpha)
              if cfg.embed_grad_alpha < 1 and not (pipelined and not hasattr(model, "embed")) else None)
    train_model = compile_model(forward_model) if cfg.compile else forward_model
    warmup = resolve_warmup(cfg.warmup_steps, cfg.steps)

    def checkpoint() -> None:
        extra = {"loop": dataclasses.asdict(state), "loader": batches.state_dict(), "fixed": fixed,
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "spike_window": guard.detector.state_dict() if guard is not None else None}
        save_ckpt(run_dir, state.step, model, optimizer, extra, cfg.keep_checkpoints)

    if guard is not None and latest_checkpoint(run_dir) is None:
        checkpoint()  # a spike before the first periodic save rolls back to the start

    bar = tqdm(total=cfg.steps, initial=state.step, desc=desc, unit="step", dynamic_ncols=True, disable=not main)
    try:
        while state.step < cfg.steps:
            lr = lr_at(state.step, cfg.lr, warmup, cfg.steps, cfg.min_lr_ratio, cfg.schedule,
                       cfg.decay_fraction)
            accum = cfg.grad_accum
            if ramp is not None:  # a pure function of tokens_seen, so resumes repeat it
                accum, lr = ramp.grad_accum(state.tokens_seen), lr * ramp.lr_scale(state.tokens_seen)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if guard is not None:
                guard.before_step(batches)
            t0 = time.perf_counter()
            if pipelined:  # the schedule runs forward and backward over its micro-batches itself
                stats = StepStats(*parallel.pipeline.forward_backward(loss_fn, batches, accum, precision,
                                                                      count_tokens))
            else:
                stats = forward_backward(train_model, loss_fn, batches, accum, device, precision, scaler,
                                         count_tokens)
            if parallel is not None:
                parallel.sync_grads()
                stats = parallel.reduce_stats(stats)  # global mean loss and total tokens on every rank
            if guard is not None and guard.is_spike(stats.loss):
                optimizer.zero_grad(set_to_none=True)
                saved = guard.recover(state.step + 1, stats.loss, model, optimizer, batches)
                state = LoopState(**saved["loop"])
                if scaler is not None and saved.get("scaler"):
                    scaler.load_state_dict(saved["scaler"])
                spike = saved["spike"]
                metrics.log({"step": spike["step"], "spike_loss": spike["loss"],
                             "rollback_to": spike["rollback_to"]})
                bar.n = state.step
                bar.refresh()
                continue
            if ramp is not None:
                stats.metrics["batch_tokens"] = stats.tokens
            if not math.isfinite(stats.loss):
                raise LmforgeError(f"step {state.step + 1}: loss is {stats.loss} (training diverged); "
                                   "lower train.lr or raise train.warmup_steps, then resume from the last "
                                   "checkpoint")
            grad_norm = optimizer_step(model, optimizer, cfg.grad_clip, scaler,
                                       parallel.pp_group if pipelined else None)
            if scaler is None and not math.isfinite(grad_norm):
                state.skipped_steps += 1
                state.skipped_in_a_row += 1
                if main:
                    bar.write(f"step {state.step + 1}: gradient norm is {grad_norm} with loss {stats.loss:.4f}; "
                              f"update skipped ({state.skipped_steps} so far)")
                if state.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise LmforgeError(f"step {state.step + 1}: {MAX_SKIPPED_IN_A_ROW} steps in a row had "
                                       "non-finite gradients (training diverged); lower train.lr or raise "
                                       "train.warmup_steps, then resume from the last checkpoint")
            else:
                state.skipped_in_a_row = 0
            for hook in on_step_end or ():
                state.latest.update(hook(model, state.step + 1))
            seconds = time.perf_counter() - t0
            state.step += 1
            state.tokens_seen += stats.tokens
            state.train_time += seconds
            state.last_loss = stats.loss
            state.add_to_window(stats, grad_norm, seconds)
            bar.update(1)
            done = state.step == cfg.steps
            if state.step % cfg.log_every == 0 or done:
                row = state.pop_window_row(lr)
                metrics.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}")
            if evaluate is not None and (done or (cfg.eval_every and state.step % cfg.eval_every == 0)):
                state.last_eval = evaluate(model)
                model.train()
                metrics.log({"step": state.step, **state.last_eval})
                shown = [f"{k} {v:.4f}" for k, v in state.last_eval.items() if isinstance(v, float)]
                bar.write(f"step {state.step}: " + ", ".join(shown))
            if done or (cfg.save_every and state.step % cfg.save_every == 0):
                checkpoint()
            if main and cfg.plot_every and state.step % cfg.plot_every == 0:
                metrics.flush()
                plot_curves(metrics.path, run_dir / PLOT_NAME)
    finally:
        bar.close()
        metrics.close()
        if shrink is not None:
            shrink.remove()
    if main:
        plot_curves(run_dir / METRICS_NAME, run_dir / PLOT_NAME)
    return {"steps": state.step, "final_loss": state.last_loss, "tokens_seen": state.tokens_seen,
            "tokens_per_s": state.tokens_seen / state.train_time if state.train_time else 0.0,
            **(state.last_eval or {})}
