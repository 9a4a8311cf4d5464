"""Batch-size ramp (GPT-3, Brown et al. 2020, App. B): the global batch grows with the tokens seen.

Early in training the gradient noise scale is small, so small batches waste no data while large ones
would (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"); GPT-3 grew its batch
linearly from 32K tokens to the full batch over the first 4-12B tokens. Here the global batch in tokens
is interpolated linearly in tokens_seen from `start_tokens` to the target (train.grad_accum
micro-batches) over `ramp_tokens`, and realized in whole micro-batches by varying the gradient
accumulation, so the loader and its resume state are unchanged. Everything is a pure function of
tokens_seen (saved in every checkpoint), so a resumed run takes the same steps.

The lr follows the batch actually used, lr * (B / B_target)^p: p = 1/2 ("sqrt", the square-root rule
for Adam-type optimizers, Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
Algorithms"), p = 1 ("linear", Goyal et al. 2017's rule for SGD), or p = 0 ("none", as GPT-3 did).
The step-based schedules (warmup, cosine, WSD) still count optimizer steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.core.config import require
from lmforge.core.errors import ConfigError
from lmforge.train.config import Batches, LrRule, TrainConfig

LR_EXPONENT: dict[str, float] = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}


@dataclass(frozen=True)
class BatchRamp:
    start_tokens: int  # global batch at tokens_seen = 0
    ramp_tokens: int  # tokens seen when the batch reaches the target
    micro_tokens: int  # tokens in one micro-batch (what the loader serves)
    target_accum: int  # micro-batches per step at the target (train.grad_accum)
    lr_rule: LrRule = "sqrt"

    @property
    def target_tokens(self) -> int:
        return self.micro_tokens * self.target_accum

    def batch_tokens(self, tokens_seen: int) -> float:
        """The ideal global batch: start + (target - start) * min(1, tokens_seen / ramp_tokens)."""
        t = min(1.0, tokens_seen / self.ramp_tokens)
        return self.start_tokens + (self.target_tokens - self.start_tokens) * t

    def grad_accum(self, tokens_seen: int) -> int:
        """Micro-batches for the next step: the ideal batch rounded to whole micro-batches, in [1, target]."""
        nearest = math.floor(self.batch_tokens(tokens_seen) / self.micro_tokens + 0.5)  # halves round up
        return max(1, min(self.target_accum, nearest))

    def lr_scale(self, tokens_seen: int) -> float:
        """(B / B_target)^p for the batch B the next step actually uses."""
        return (self.grad_accum(tokens_seen) / self.target_accum) ** LR_EXPONENT[self.lr_rule]


def measure_micro_tokens(batches: Batches, count_tokens: Callable[[Any], int]) -> int:
    """Tokens in one micro-batch: draw one and put the source back where it was (its state_dict)."""
    position = copy.deepcopy(batches.state_dict())
    tokens = count_tokens(batches.next_batch())
    batches.load_state_dict(position)
    return tokens


def ramp_from_config(cfg: TrainConfig, batches: Batches, count_tokens: Callable[[Any], int]) -> BatchRamp | None:
    """The run's ramp, or None when train.batch_ramp.start is 0 (off)."""
    if cfg.batch_ramp.start == 0:
        return None
    micro = measure_micro_tokens(batches, count_tokens)
    if micro <= 0:
        raise ConfigError("train.batch_ramp.start: cannot count the tokens of a batch from this source")
    ramp = BatchRamp(cfg.batch_ramp.start, cfg.batch_ramp.tokens, micro, cfg.grad_accum, cfg.batch_ramp.lr)
    require(ramp.start_tokens <= ramp.target_tokens, "train.batch_ramp.start", cfg.batch_ramp.start,
            f"at most the target batch of {ramp.target_tokens} tokens (train.grad_accum {cfg.grad_accum} x "
            f"{micro} tokens per micro-batch)")
    return ramp
