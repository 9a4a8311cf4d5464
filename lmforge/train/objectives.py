"""Training objectives as pure functions of logits and targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.core.tensors import IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: -mean log p(x_t | x_<t) over positions whose target is not ignored.

    `targets` are the inputs shifted left by one (the loader does the shift), so logits and
    targets line up position by position. Computed in fp32 for a stable log-softmax under autocast.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)
