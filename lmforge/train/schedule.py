"""Learning-rate schedules: linear warmup, then cosine decay or warmup-stable-decay (WSD).

Each schedule is a pure function of the step, so a resumed run needs no scheduler state: the step
alone gives the lr. `lr_at` picks one by name (`TrainConfig.schedule`).
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["cosine", "wsd"]


def resolve_warmup(warmup_steps: int, total_steps: int) -> int:
    """`warmup_steps=-1` means 1% of the run (at least one step), the usual default for short runs."""
    if warmup_steps >= 0:
        return warmup_steps
    return max(1, round(0.01 * total_steps))


def warmup_lr(step: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warmup, peak * (step + 1) / warmup: the first step is small but not zero, and step
    `warmup_steps - 1` reaches the peak."""
    return peak_lr * (step + 1) / warmup_steps


def cosine_lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float) -> float:
    """Warmup, then cosine decay (Loshchilov & Hutter 2017, eq. 5),
    min + (peak - min) * (1 + cos(pi * t)) / 2 with t = (step - warmup) / (total - warmup),
    which reaches min_lr_ratio * peak at `total_steps` and stays there beyond it.
    """
    if step < warmup_steps:
        return warmup_lr(step, peak_lr, warmup_steps)
    min_lr = min_lr_ratio * peak_lr
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def wsd_decay_start(warmup_steps: int, total_steps: int, decay_fraction: float) -> int:
    """First step of WSD's decay: the last round(decay_fraction * total) steps (at least one) decay,
    but never before warmup ends. Checkpoints saved before this step are the ones to branch from
    when extending a run (the point of WSD: the stable phase has no fixed end)."""
    decay_steps = max(1, round(decay_fraction * total_steps))
    return max(warmup_steps, total_steps - decay_steps)


def wsd_lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float,
              decay_fraction: float) -> float:
    """Warmup-stable-decay (MiniCPM, Hu et al. 2024; Hägele et al. 2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations").

    Linear warmup, the peak lr held constant, then over the last `decay_fraction` of the steps a
    "1 - sqrt" cooldown, min + (peak - min) * (1 - sqrt(t)) with t = (step - decay_start) /
    (total - decay_start). We use 1-sqrt rather than linear because Hägele et al. find it reaches a
    lower final loss than a linear cooldown of the same length: it drops the lr fast at first, then
    lingers near the floor. Like the cosine, it reaches min_lr_ratio * peak at
    `total_steps` and stays there beyond it.
    """
    if step < warmup_steps:
        return warmup_lr(step, peak_lr, warmup_steps)
    decay_start = wsd_decay_start(warmup_steps, total_steps, decay_fraction)
    if step < decay_start:
        return peak_lr
    min_lr = min_lr_ratio * peak_lr
    t = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return min_lr + (peak_lr - min_lr) * (1.0 - math.sqrt(t))


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float,
          schedule: Schedule = "cosine", decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based) under `schedule`; `decay_fraction` is WSD's only."""
    if schedule == "cosine":
        return cosine_lr_at(step, peak_lr, warmup_steps, total_steps, min_lr_ratio)
    if schedule == "wsd":
        return wsd_lr_at(step, peak_lr, warmup_steps, total_steps, min_lr_ratio, decay_fraction)
    raise ValueError(f"unknown lr schedule {schedule!r}")
