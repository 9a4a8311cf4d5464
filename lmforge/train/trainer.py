"""The training loop every stage shares (`lmforge.train.pretrain` feeds it token shards and the LM loss).

`train_loop` knows nothing of what it trains: it takes a model, `loss_fn(model, batch) -> (loss,
metrics)` and a batch source with next_batch()/state_dict()/load_state_dict(). It owns the rest:
AdamW + warmup with cosine or WSD lr, gradient accumulation and clipping, mixed precision, periodic evaluation,
metrics, plots, and atomic checkpoints that resume bit for bit. SFT, DPO and GRPO reuse it with
their own loss and batches.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn
from tqdm import tqdm

from lmforge.config import option
from lmforge.errors import ConfigError, LmforgeError
from lmforge.parallel.grad import clip_grad_norm
from lmforge.parallel.run import DistributedRun, QuietMetrics
from lmforge.runtime import autocast, compile_model, resolve_device, resolve_precision
from lmforge.train.checkpoint import latest_checkpoint, save_checkpoint
from lmforge.train.dcp import load_any_checkpoint
from lmforge.train.metrics import METRICS_NAME, PLOT_NAME, MetricsLogger, plot_curves
from lmforge.train.optim import build_optimizer
from lmforge.train.ramp import LrRule, ramp_from_config
from lmforge.train.schedule import Schedule, lr_at, resolve_warmup
from lmforge.train.stability import SpikeGuard, input_embedding, shrink_embedding_gradient

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer steps")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(3e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final lr of the decay (cosine or wsd), as a fraction of the peak")
    schedule: Schedule = option("cosine", "lr after warmup: cosine decays over the whole run; wsd holds the "
                                          "peak, then decays (1-sqrt) at the end, so a run can be extended "
                                          "from a stable-phase checkpoint")
    decay_fraction: float = option(0.2, "wsd only: share of train.steps in the final decay (Hägele et al. "
                                        "2024 find 20% matches cosine)")
    warmup_steps: int = option(-1, "linear warmup steps; -1 means 1% of steps (at least 1)")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay on weight matrices (not on embeddings, "
                                      "norms or biases)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 disables clipping")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "autocast precision (fp32 master weights); auto is bf16 where the hardware is fast at it")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto")
    compile: bool = option(False, "torch.compile the model (pays 20-40 s up front; worth it for long runs)")
    fused_ce: bool = option(True, "LM loss: run the head and cross-entropy chunk by chunk "
                                  "(linear_cross_entropy), so [tokens, vocab] logits and their gradient never "
                                  "exist in full: less memory, faster with large vocabularies; false "
                                  "materializes them (the reference path)")
    seed: int = option(0, "seed of weight init and dropout")
    log_every: int = option(10, "write a metrics row every this many steps")
    eval_every: int = option(100, "validate every this many steps (and at the end); 0 only at the end")
    eval_batches: int = option(20, "batches per validation")
    save_every: int = option(200, "checkpoint every this many steps (and at the end); 0 only at the end")
    keep_checkpoints: int = option(2, "newest checkpoints kept on disk; 0 keeps all")
    plot_every: int = option(50, "redraw RUN/loss.png every this many steps (and at the end); 0 only at "
                                 "the end")
    # optimizer and stability options (lmforge.train.adafactor, .ramp, .stability)
    optimizer: Literal["adamw", "adafactor"] = option(
        "adamw", "adamw, or adafactor (factored second moments: O(n+m) state per n x m matrix; "
                 "train.adafactor_* options; weight_decay applies, beta1/beta2/eps do not)")
    adafactor_beta1: float = option(0.0, "adafactor: first-moment decay; 0 keeps none (T5), PaLM uses 0.9")
    adafactor_decay_rate: float = option(-0.8, "adafactor: second-moment decay beta2_t = 1 - step^decay_rate")
    adafactor_clip: float = option(1.0, "adafactor: clip the update's RMS to this (d in Shazeer & Stern 2018)")
    adafactor_scale_parameter: bool = option(True, "adafactor: step size relative to the parameter, "
                                                   "lr * max(1e-3, RMS(param))")
    adafactor_relative_step: bool = option(True, "adafactor: lr becomes min(train.lr, 1/sqrt(step)); with "
                                                 "train.lr 1e-2 and a constant schedule this is T5's")
    z_loss: float = option(0.0, "LM loss: add z_loss * mean(log^2 Z) of the output softmax (PaLM: 1e-4) to "
                                "keep the logits' normalizer near 1; 0 disables")
    embed_grad_alpha: float = option(1.0, "scale the token embedding's gradient by this, forward unchanged "
                                          "(GLM-130B: 0.1); 1 disables")
    batch_ramp_start: int = option(0, "batch-size ramp (GPT-3): global batch in tokens at the start; it grows "
                                      "linearly to grad_accum micro-batches over train.batch_ramp_tokens "
                                      "tokens, in whole micro-batches; 0 disables")
    batch_ramp_tokens: int = option(0, "tokens seen when the ramp reaches the full batch")
    batch_ramp_lr: LrRule = option("sqrt", "lr during the ramp times (batch / full batch)^p: sqrt p=1/2 "
                                           "(Adam), linear p=1 (SGD), none p=0")
    spike_k: float = option(0.0, "loss-spike rollback: a loss more than k std above the recent window rolls "
                                 "back to the last checkpoint and skips the batches since it (RUN/spikes.jsonl); "
                                 "0 disables; checkpoints come from train.save_every")
    spike_window: int = option(50, "steps in the spike detector's window")
    spike_warmup: int = option(20, "accepted losses before spikes are detected (non-finite ones always are)")
    spike_skip_batches: int = option(0, "more micro-batches to skip after a spike's own (PaLM skipped 200-500 "
                                        "batches around a spike, counting those since the checkpoint)")
    spike_max_rollbacks: int = option(3, "stop after this many rollbacks to the same checkpoint")

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "train.steps", self.steps, "positive")
        _require(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "positive")
        _require(self.lr > 0, "train.lr", self.lr, "positive")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        _require(0 < self.decay_fraction <= 1, "train.decay_fraction", self.decay_fraction, "in (0, 1]")
        _require(self.warmup_steps >= -1, "train.warmup_steps", self.warmup_steps,
                 ">= 0, or -1 for 1% of steps")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        _require(0 <= self.beta1 < 1, "train.beta1", self.beta1, "in [0, 1)")
        _require(0 <= self.beta2 < 1, "train.beta2", self.beta2, "in [0, 1)")
        _require(self.eps > 0, "train.eps", self.eps, "positive")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, ">= 0")
        _require(self.log_every >= 1, "train.log_every", self.log_every, "positive")
        _require(self.eval_batches >= 1, "train.eval_batches", self.eval_batches, "positive")
        for name in ("eval_every", "save_every", "keep_checkpoints", "plot_every"):
            _require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), ">= 0")
        _require(0 <= self.adafactor_beta1 < 1, "train.adafactor_beta1", self.adafactor_beta1, "in [0, 1)")
        _require(self.adafactor_decay_rate < 0, "train.adafactor_decay_rate", self.adafactor_decay_rate,
                 "negative")
        _require(self.adafactor_clip > 0, "train.adafactor_clip", self.adafactor_clip, "positive")
        _require(self.z_loss >= 0, "train.z_loss", self.z_loss, ">= 0")
        _require(0 < self.embed_grad_alpha <= 1, "train.embed_grad_alpha", self.embed_grad_alpha, "in (0, 1]")
        _require(self.batch_ramp_start >= 0, "train.batch_ramp_start", self.batch_ramp_start, ">= 0")
        _require(self.batch_ramp_start == 0 or self.batch_ramp_tokens > 0, "train.batch_ramp_tokens",
                 self.batch_ramp_tokens, "positive when train.batch_ramp_start is set")
        _require(self.spike_k >= 0, "train.spike_k", self.spike_k, ">= 0")
        _require(2 <= self.spike_warmup <= self.spike_window, "train.spike_warmup", self.spike_warmup,
                 f"in [2, train.spike_window={self.spike_window}]")
        _require(self.spike_skip_batches >= 0, "train.spike_skip_batches", self.spike_skip_batches, ">= 0")
        _require(self.spike_max_rollbacks >= 1, "train.spike_max_rollbacks", self.spike_max_rollbacks,
                 "positive")


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {what}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# one optimizer step


class Batches(Protocol):
    """A resumable batch source (e.g. `lmforge.data.loader.SequenceLoader`)."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]
Evaluate = Callable[[nn.Module], dict[str, float]]
StepEnd = Callable[[nn.Module, int], dict[str, float]]


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
                   scaler: torch.amp.GradScaler | None = None) -> float:
    """Clip the global grad norm (unscaled first under fp16), step, zero grads; returns the pre-clip norm."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    norm = clip_grad_norm(model.parameters(), max_norm)  # also sharded (DTensor) gradients
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
        row.update(self.latest)
        self.latest = {}
        return row


def train_loop(model: nn.Module, loss_fn: LossFn, batches: Batches, cfg: TrainConfig, run_dir: str | Path, *,
               evaluate: Evaluate | None = None, resume: bool = False,
               count_tokens: Callable[[Any], int] = tokens_in, desc: str = "train",
               on_step_end: list[StepEnd] | None = None, parallel: DistributedRun | None = None) -> dict[str, Any]:
    """Train `model` for cfg.steps optimizer steps; checkpoints, metrics.jsonl, tb/, loss.png go in run_dir.

    `model` must be the plain module with a `.cfg` (checkpoints are model directories); it is moved
    to the device and trained in place. `evaluate(model) -> {"val_loss": ..., ...}` runs every
    cfg.eval_every steps and at the end. With `resume`, model, optimizer, loader, RNG and counters
    come back from RUN/checkpoints/latest, so the rest of the run repeats an uninterrupted one.
    `on_step_end` hooks run after each optimizer step as hook(model, step) (e.g. MoE router-bias
    updates, data-mixture bookkeeping); the next metrics row shows the latest value of each metric they
    return (running totals stay exact; loss_fn metrics, by contrast, are averaged over the row's steps).
    Returns {"steps", "final_loss", "tokens_seen", "tokens_per_s", **last evaluation}.
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device) if parallel is None else parallel.device
    main = parallel is None or parallel.is_main  # only rank 0 writes metrics, plots and progress
    load_ckpt, save_ckpt = ((load_any_checkpoint, save_checkpoint) if parallel is None
                            else (parallel.load_checkpoint, parallel.save_checkpoint))
    precision = resolve_precision(cfg.precision, device)
    model.to(device).train()
    forward_model = model if parallel is None else parallel.prepare(model)  # shards before the optimizer sees it
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
        state = LoopState(**saved["loop"])
        batches.load_state_dict(saved["loader"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        if main:
            print(f"resuming {run_dir} from step {state.step}", file=sys.stderr)
    metrics = (MetricsLogger(run_dir, resume_step=state.step if saved is not None else None) if main
               else QuietMetrics())
    ramp = ramp_from_config(cfg, batches, count_tokens)
    guard = None if cfg.spike_k == 0 else SpikeGuard(run_dir, cfg.spike_k, cfg.spike_window, cfg.spike_warmup,
                                                    cfg.spike_skip_batches, cfg.spike_max_rollbacks, load_ckpt, main)
    if guard is not None and saved is not None:
        guard.detector.load_state_dict(saved.get("spike_window") or {})
    shrink = (shrink_embedding_gradient(input_embedding(model), cfg.embed_grad_alpha)
              if cfg.embed_grad_alpha < 1 else None)
    train_model = compile_model(forward_model) if cfg.compile else forward_model
    warmup = resolve_warmup(cfg.warmup_steps, cfg.steps)

    def checkpoint() -> None:
        extra = {"loop": dataclasses.asdict(state), "loader": batches.state_dict(),
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
            stats = forward_backward(train_model, loss_fn, batches, accum, device, precision, scaler,
                                     count_tokens)
            if parallel is not None:
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
            grad_norm = optimizer_step(model, optimizer, cfg.grad_clip, scaler)
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
