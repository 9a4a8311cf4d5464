"""What `train_loop` takes: its config (`TrainConfig`, the `train.*` keys) and the batch-source protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from lmforge.core.config import option, require
from lmforge.core.runtime import DEVICE_HELP, is_device_name
from lmforge.train.schedule import Schedule

LrRule = Literal["sqrt", "linear", "none"]  # how lr follows the batch-size ramp (lmforge.train.ramp)


@dataclass
class AdafactorConfig:
    """`train.adafactor.*`: Adafactor's own knobs (Shazeer & Stern 2018), read when train.optimizer = adafactor."""

    beta1: float = option(0.0, "first-moment decay; 0 keeps none (T5), PaLM uses 0.9")
    decay_rate: float = option(-0.8, "second-moment decay beta2_t = 1 - step^decay_rate")
    clip: float = option(1.0, "clip the update's RMS to this (d in Shazeer & Stern 2018)")
    scale_parameter: bool = option(True, "step size relative to the parameter, lr * max(1e-3, RMS(param))")
    relative_step: bool = option(True, "lr becomes min(train.lr, 1/sqrt(step)); with train.lr 1e-2 and a "
                                       "constant schedule this is T5's")

    def __post_init__(self) -> None:
        require(0 <= self.beta1 < 1, "train.adafactor.beta1", self.beta1, "in [0, 1)")
        require(self.decay_rate < 0, "train.adafactor.decay_rate", self.decay_rate, "negative")
        require(self.clip > 0, "train.adafactor.clip", self.clip, "positive")


@dataclass
class BatchRampConfig:
    """`train.batch_ramp.*`: the GPT-3 batch-size ramp (lmforge.train.ramp); off while start is 0."""

    start: int = option(0, "global batch in tokens at the start; it grows linearly to grad_accum micro-batches "
                           "over train.batch_ramp.tokens tokens, in whole micro-batches; 0 disables")
    tokens: int = option(0, "tokens seen when the ramp reaches the full batch")
    lr: LrRule = option("sqrt", "lr during the ramp times (batch / full batch)^p: sqrt p=1/2 (Adam), "
                                "linear p=1 (SGD), none p=0")

    def __post_init__(self) -> None:
        require(self.start >= 0, "train.batch_ramp.start", self.start, ">= 0")
        require(self.start == 0 or self.tokens > 0, "train.batch_ramp.tokens", self.tokens,
                "positive when train.batch_ramp.start is set")


@dataclass
class SpikeConfig:
    """`train.spike.*`: loss-spike rollback (lmforge.train.stability); off while k is 0."""

    k: float = option(0.0, "a loss more than k std above the recent window rolls back to the last checkpoint "
                           "and skips the batches since it (RUN/spikes.jsonl); 0 disables; checkpoints come "
                           "from train.save_every")
    window: int = option(50, "steps in the spike detector's window")
    warmup: int = option(20, "accepted losses before spikes are detected (non-finite ones always are)")
    skip_batches: int = option(0, "more micro-batches to skip after a spike's own (PaLM skipped 200-500 "
                                  "batches around a spike, counting those since the checkpoint)")
    max_rollbacks: int = option(3, "stop after this many rollbacks to the same checkpoint")

    def __post_init__(self) -> None:
        require(self.k >= 0, "train.spike.k", self.k, ">= 0")
        require(2 <= self.warmup <= self.window, "train.spike.warmup", self.warmup,
                f"in [2, train.spike.window={self.window}]")
        require(self.skip_batches >= 0, "train.spike.skip_batches", self.skip_batches, ">= 0")
        require(self.max_rollbacks >= 1, "train.spike.max_rollbacks", self.max_rollbacks, "positive")


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
                 "train.adafactor.* options; weight_decay applies, beta1/beta2/eps do not)")
    adafactor: AdafactorConfig = option(default_factory=AdafactorConfig)
    z_loss: float = option(0.0, "LM loss: add z_loss * mean(log^2 Z) of the output softmax (PaLM: 1e-4) to "
                                "keep the logits' normalizer near 1; 0 disables")
    embed_grad_alpha: float = option(1.0, "scale the token embedding's gradient by this, forward unchanged "
                                          "(GLM-130B: 0.1); 1 disables")
    batch_ramp: BatchRampConfig = option(default_factory=BatchRampConfig)
    spike: SpikeConfig = option(default_factory=SpikeConfig)

    def __post_init__(self) -> None:
        require(self.steps >= 1, "train.steps", self.steps, "positive")
        require(is_device_name(self.device), "train.device", self.device, DEVICE_HELP)
        require(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "positive")
        require(self.lr > 0, "train.lr", self.lr, "positive")
        require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        require(0 < self.decay_fraction <= 1, "train.decay_fraction", self.decay_fraction, "in (0, 1]")
        require(self.warmup_steps >= -1, "train.warmup_steps", self.warmup_steps,
                 ">= 0, or -1 for 1% of steps")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        require(0 <= self.beta1 < 1, "train.beta1", self.beta1, "in [0, 1)")
        require(0 <= self.beta2 < 1, "train.beta2", self.beta2, "in [0, 1)")
        require(self.eps > 0, "train.eps", self.eps, "positive")
        require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, ">= 0")
        require(self.log_every >= 1, "train.log_every", self.log_every, "positive")
        require(self.eval_batches >= 1, "train.eval_batches", self.eval_batches, "positive")
        for name in ("eval_every", "save_every", "keep_checkpoints", "plot_every"):
            require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), ">= 0")
        require(self.z_loss >= 0, "train.z_loss", self.z_loss, ">= 0")
        require(0 < self.embed_grad_alpha <= 1, "train.embed_grad_alpha", self.embed_grad_alpha, "in (0, 1]")


class Batches(Protocol):
    """A resumable batch source (e.g. `lmforge.data.loader.SequenceLoader`)."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]
Evaluate = Callable[[nn.Module], dict[str, float]]
StepEnd = Callable[[nn.Module, int], dict[str, float]]
