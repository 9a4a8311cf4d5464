"""The prompt checks every decode loop starts with: ids inside the vocabulary, cut to leave room to answer.

They sit below every strategy (sampling, batch, beam, contrastive, speculative) so each loop fails the
same way on a bad prompt and keeps the same tail of a long one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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
