"""The optimizer (AdamW, or Adafactor) with the usual two parameter groups: weight decay on weight matrices only.

Decay pulls weights toward zero; that regularizes projection matrices but hurts embeddings (rare
tokens' rows shrink between their updates), norm gains (whose identity value is 1) and biases. This
is the grouping of GPT-2/nanoGPT and LLaMA training (Loshchilov & Hutter, 2019, decoupled decay).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmforge.train.adafactor import Adafactor

if TYPE_CHECKING:
    from lmforge.train.config import TrainConfig

FUSED_DEVICE_TYPES = ("cuda", "cpu")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """[decay group, no-decay group] over trainable parameters, each parameter exactly once.

    Decay: tensors with dim >= 2 that are not an `nn.Embedding` weight. A tied LM head is the same
    Parameter as the embedding, so it lands in the no-decay group with it.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicates shared (tied) parameters
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """cfg.optimizer over `param_groups`: AdamW (the fused kernel where the device has one, multi-tensor
    otherwise), or `Adafactor` with the train.adafactor.* options."""
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    if cfg.optimizer == "adafactor":
        ada = cfg.adafactor
        return Adafactor(groups, lr=cfg.lr, beta1=ada.beta1, decay_rate=ada.decay_rate, clip_threshold=ada.clip,
                         weight_decay=cfg.weight_decay, scale_parameter=ada.scale_parameter,
                         relative_step=ada.relative_step)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in FUSED_DEVICE_TYPES and p.is_floating_point()
                                 for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None,
                             foreach=None if fused else True)
