"""Learning-rate schedule: linear warmup, then cosine decay to a floor (Loshchilov & Hutter 2017, eq. 5).

A pure function of the step, so a resumed run needs no scheduler state: the step alone gives the lr.
"""

from __future__ import annotations

import math


def resolve_warmup(warmup_steps: int, total_steps: int) -> int:
    """`warmup_steps=-1` means 1% of the run (at least one step), the usual default for short runs."""
    if warmup_steps >= 0:
        return warmup_steps
    return max(1, round(0.01 * total_steps))


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Warmup: lr rises linearly, peak * (step + 1) / warmup, so the first step is small but not zero
    and step `warmup_steps - 1` reaches the peak. Then cosine decay,
    min + (peak - min) * (1 + cos(pi * t)) / 2 with t = (step - warmup) / (total - warmup),
    which reaches min_lr_ratio * peak at `total_steps` and stays there beyond it.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    min_lr = min_lr_ratio * peak_lr
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
