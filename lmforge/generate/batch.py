"""Batched sampling for rollouts: many prompts (and several samples of each) decoded together.

RL stages (GRPO, PPO, best-of-N, rejection sampling) need G completions for each of many prompts;
decoding them one by one leaves the matrix units idle. Here every row shares one preallocated
`KVCache`. Prompts of different lengths are LEFT-padded so all rows end at the same cache slot and
each decode step writes one slot for the whole batch; an attention mask hides the padding keys and
per-row positions make every row see exactly the positions it would see alone, so greedy output
equals `lmforge.generate.engine.generate` row by row (tested). A row that samples a stop token is
finished (the stop token is not returned); the loop ends when all rows are. A prefix LM's prompts are
prefilled bidirectionally over their real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmforge.generate.processors import History
from lmforge.generate.prompt import check_prompt, fit_prompt
from lmforge.generate.sampling import SamplingParams, new_generator, sample_next


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, L] and the number of pad tokens in front of each row [B]."""
    width = max(len(p) for p in prompts)
    pads = torch.tensor([width - len(p) for p in prompts])
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    return ids, pads


def prefill_mask(pads: torch.Tensor, width: int, prefix: bool = False) -> torch.Tensor:
    """[B, 1, L, L] bool: causal (`prefix`: every prompt token, as a prefix LM reads it) and not a pad key. A pad
    query attends to itself only, so no row of the softmax is empty (SDPA would return NaN); its output is
    never used."""
    idx = torch.arange(width, device=pads.device)
    causal = idx[None, :] <= idx[:, None] if not prefix else torch.ones(width, width, dtype=torch.bool,
                                                                           device=pads.device)
    real_key = idx[None, :] >= pads[:, None]  # [B, L]
    mask = causal[None] & real_key[:, None, :]
    return (mask | torch.eye(width, dtype=torch.bool, device=pads.device)[None])[:, None]


@torch.no_grad()
def generate_batch(model: nn.Module, prompts: list[list[int]], params: SamplingParams,
                   num_return_sequences: int = 1, seed: int | None = None, keep_stop: bool = False,
                   seeds: Sequence[int] | None = None) -> list[list[int]]:
    """New token ids (stop token not included) for each prompt, `num_return_sequences` rows per prompt.
    `keep_stop` appends the stop token a row ended with (RL trains on it, so the policy learns to stop).

    Rows come prompt-major: the samples of prompt i are rows i*n .. i*n+n-1. `seed` (else
    `params.seed`) seeds one generator for the whole batch, so a call is reproducible but a row's
    sample depends on its batch; `seeds` (one per prompt) instead draws each prompt's rows from its own
    generator, so they do not depend on the other prompts of the call (up to float rounding of a
    differently padded batch): RL rollouts split over data-parallel ranks sample what one process does.
    Prompts too long for the model keep their last tokens (with a warning), as in `generate`; every
    row stops at `params.max_new_tokens` or when the longest prompt plus the new tokens fills
    `max_seq_len`.
    """
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if not prompts:
        return []
    max_len = model.context_length
    fitted = []
    for p in prompts:
        check_prompt(p, model.cfg.vocab_size)
        fitted += [fit_prompt(p, max_len)] * num_return_sequences
    device = next(model.parameters()).device
    ids, pads = left_pad(fitted)
    ids, pads = ids.to(device), pads.to(device)
    B, L = ids.shape
    budget = min(params.max_new_tokens, max_len - L)
    out: list[list[int]] = [[] for _ in range(B)]
    if budget <= 0:
        return out
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"seeds: one per prompt, got {len(seeds)} for {len(prompts)} prompts")
    generator = ([torch.Generator(device=device).manual_seed(s) for s in seeds] if seeds is not None
                 else new_generator(seed if seed is not None else params.seed, device))
    stop = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, L + budget - 1)
        positions = (torch.arange(L, device=device)[None, :] - pads[:, None]).clamp(min=0)
        mask = prefill_mask(pads, L, prefix=getattr(model.cfg, "prefix_lm", False))
        logits = model(ids, cache=cache, start_pos=0, positions=positions, attn_mask=mask)[:, -1]
        # keys a decode step may attend to: every real prompt token and every generated slot
        real_key = torch.ones(B, L + budget, dtype=torch.bool, device=device)
        real_key[:, :L] = torch.arange(L, device=device)[None, :] >= pads[:, None]
        next_pos = L - pads  # each row's own length so far
        done = torch.zeros(B, dtype=torch.bool, device=device)
        # tokens so far for history-dependent processors: -1 marks padding, generated columns start at L
        seen = torch.where(real_key[:, :L], ids, -1)
        for step in range(budget):
            history = History(seen, L) if params.needs_history else None
            token = sample_next(logits, params, generator, history)
            if history is not None:
                seen = torch.cat([seen, token[:, None]], dim=1)
            stopped = torch.isin(token, stop) & ~done
            done |= stopped
            emit = ~done | stopped if keep_stop else ~done
            for row in emit.nonzero().flatten().tolist():
                out[row].append(int(token[row]))
            if bool(done.all()) or step + 1 == budget:
                break
            slot = L + step
            mask = real_key[:, None, None, : slot + 1]
            logits = model(token[:, None], cache=cache, start_pos=slot, positions=next_pos[:, None],
                           attn_mask=mask)[:, -1]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return out
