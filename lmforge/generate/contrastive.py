"""Contrastive search (Su et al., 2022, "A Contrastive Framework for Neural Text Generation", eq. 5).

Among the k most likely next tokens V(k), pick

    x_t = argmax_{v in V(k)} (1 - alpha) * p(v | x_<t) - alpha * max_{j < t} cos(h_v, h_j)

where h_v is the model's last hidden state for the sequence extended by v and h_j those of the
context so far: the degeneration penalty prefers tokens whose representation differs from what was
already said. alpha = 0 is greedy search.

All k candidates are scored in ONE forward pass over the shared KV cache: they go in as k tokens at
the same position, each masked to see the cached context and itself only, and the chosen
candidate's key/value slot is then copied to the first candidate slot. That pass also gives the
chosen token's next-token distribution, so each step costs one forward of k tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.generate.prompt import check_prompt, fit_prompt, prefill_kwargs


def degeneration_scores(probs: torch.Tensor, cand_hidden: torch.Tensor, context_hidden: torch.Tensor,
                        alpha: float) -> torch.Tensor:
    """Eq. 5 for k candidates: probs [k], cand_hidden [k, d], context_hidden [t, d] -> scores [k]."""
    sim = F.cosine_similarity(cand_hidden[:, None, :], context_hidden[None, :, :], dim=-1)  # [k, t]
    return (1.0 - alpha) * probs - alpha * sim.max(dim=-1).values


def contrastive_stream(model: nn.Module, prompt_ids: Sequence[int], alpha: float = 0.6, top_k: int = 4,
                       max_new_tokens: int = 64, stop_token_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield new tokens of contrastive search; stop tokens end it and are not yielded."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"contrastive search: penalty_alpha must be in [0, 1], got {alpha}")
    if top_k < 1:
        raise ConfigError(f"contrastive search: top_k must be >= 1, got {top_k}")
    check_prompt(prompt_ids, model.cfg.vocab_size)
    prompt = fit_prompt(prompt_ids, model.context_length)
    return _search(model, prompt, alpha, min(top_k, model.cfg.vocab_size), max_new_tokens, set(stop_token_ids))


@torch.no_grad()  # a decorated generator function runs every step without autograd
def _search(model: nn.Module, prompt: list[int], alpha: float, k: int, max_new_tokens: int,
            stop: set[int]) -> Iterator[int]:
    device = next(model.parameters()).device
    budget = min(max_new_tokens, model.context_length - len(prompt))
    was_training = model.training
    model.eval()
    try:
        # the k candidates take k cache slots past the last real token
        cache = model.new_cache(1, min(len(prompt) + budget - 1 + k, model.context_length))
        hidden = model(torch.tensor([prompt], device=device), cache=cache, start_pos=0, return_hidden=True,
                       **prefill_kwargs(model, 1, len(prompt), device))[0]
        context = hidden  # [t, d], hidden states of every token so far
        logits = model.lm_head(hidden[-1:])[0]
        pos = len(prompt)
        for step in range(budget):
            probs = torch.softmax(logits.float(), dim=-1)
            top = torch.topk(probs, k)
            if pos + k > model.context_length:  # no room left for the candidates: finish greedily
                token = int(top.indices[0])
                if token not in stop:
                    yield token
                return
            mask = torch.cat([torch.ones(k, pos, dtype=torch.bool, device=device),
                              torch.eye(k, dtype=torch.bool, device=device)], dim=1)[None, None]
            cand_hidden = model(top.indices[None].to(device), cache=cache, start_pos=pos,
                                positions=torch.full((k,), pos, device=device), attn_mask=mask,
                                return_hidden=True)[0]  # [k, d]
            best = int(torch.argmax(degeneration_scores(top.values, cand_hidden.float(), context.float(), alpha)))
            token = int(top.indices[best])
            if token in stop:
                return
            yield token
            if step + 1 == budget:
                return
            if best:  # cache slots come after any prompt/prefix-tuning virtual tokens
                slot = pos + (0 if model.virtual_tokens is None else model.virtual_tokens.n_tokens)
                cache.copy_slot(slot, slot + best)
            context = torch.cat([context, cand_hidden[best:best + 1]])
            logits = model.lm_head(cand_hidden[best:best + 1])[0]
            pos += 1
    finally:
        model.train(was_training)


def contrastive_search(model: nn.Module, prompt_ids: Sequence[int], alpha: float = 0.6, top_k: int = 4,
                       max_new_tokens: int = 64, stop_token_ids: Sequence[int] = ()) -> list[int]:
    return list(contrastive_stream(model, prompt_ids, alpha, top_k, max_new_tokens, stop_token_ids))
