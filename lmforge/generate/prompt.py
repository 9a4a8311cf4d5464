"""The prompt checks every decode loop starts with: ids inside the vocabulary, cut to leave room to answer;
and how the prompt is prefilled (a prefix LM reads it as its bidirectional prefix).

They sit below every strategy (sampling, batch, beam, contrastive, speculative) so each loop fails the
same way on a bad prompt, keeps the same tail of a long one and reads it the way the model was trained to.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lmforge.core.errors import LmforgeError

log = logging.getLogger(__name__)


def fit_prompt(prompt_ids: Sequence[int], max_seq_len: int) -> list[int]:
    """Keep the last `max_seq_len - 1` tokens so at least one new token fits; warn when cutting."""
    room = max_seq_len - 1
    if len(prompt_ids) <= room:
        return list(prompt_ids)
    log.warning("prompt of %d tokens is longer than the model's max_seq_len=%d allows; "
                "keeping its last %d tokens", len(prompt_ids), max_seq_len, room)
    return list(prompt_ids[-room:])


def check_prompt(prompt_ids: Sequence[int], vocab_size: int) -> None:
    if len(prompt_ids) == 0:
        raise LmforgeError("generate: the prompt is empty; give at least one token (e.g. a bos token)")
    for i, t in enumerate(prompt_ids):
        if not 0 <= int(t) < vocab_size:
            raise LmforgeError(f"generate: prompt token {i} is {t}, "
                               f"outside the model's vocabulary [0, {vocab_size})")


def prefill_kwargs(model: nn.Module, rows: int, length: int | Sequence[int], device: torch.device
                   ) -> dict[str, Any]:
    """Extra arguments of the forward that prefills `rows` prompts of `length` tokens (or row i of length[i])
    into a fresh cache: a prefix LM (`model.cfg.prefix_lm`) reads the whole prompt as its prefix, both ways;
    later tokens attend causally to it through the cache. Nothing for a causal model. The server's scheduler
    prefills a prefix LM's prompts the same way."""
    if not getattr(model.cfg, "prefix_lm", False):
        return {}
    if isinstance(length, int):
        return {"prefix_len": torch.full((rows,), length, device=device)}
    return {"prefix_len": torch.tensor(list(length), device=device)}
