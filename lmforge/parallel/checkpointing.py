"""Activation checkpointing per Transformer block, applied from outside the model (Chen et al. 2016).

A checkpointed block keeps only its input during forward and recomputes its activations in backward:
activation memory falls from O(layers x activations) to O(layers x inputs + one block's activations) at
the cost of one more forward per block. The block's `forward` is wrapped on the instance, so parameter
names (and therefore checkpoints) do not change, and FSDP hooks stay outside the recomputation.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, decoder then encoder (encoder-decoder models): the unit of sharding and recompute.
    A module around a Transformer (a reward model's backbone, PPO's policy with a value head) gives its blocks;
    a pipeline stage holds its blocks in a ModuleDict keyed by their index in the whole model."""
    core = next((m for m in model.modules()
                 if isinstance(getattr(m, "blocks", None), (nn.ModuleList, nn.ModuleDict))), model)
    blocks = getattr(core, "blocks", [])
    blocks = list(blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks)
    encoder = getattr(core, "encoder", None)
    return blocks + (list(encoder) if isinstance(encoder, nn.ModuleList) else [])


def checkpointed_blocks(model: nn.Module) -> int:
    """How many of `transformer_blocks(model)` recompute their activations in backward."""
    return sum(isinstance(b.forward, functools.partial) and b.forward.func is _checkpointed
               for b in transformer_blocks(model))


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> int:
    """Wrap `transformer_blocks(model)`: all (mode 'full') or every `every`-th ('every_n'); returns how many."""
    if mode == "none":
        return 0
    n = 0
    for i, block in enumerate(transformer_blocks(model)):
        if mode == "full" or i % every == 0:
            block.forward = functools.partial(_checkpointed, block.forward)
            n += 1
    return n
