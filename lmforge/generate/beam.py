"""Beam search on one KV cache: the K beams are the K rows of a batch, reordered after every step.

Follows HF transformers' beam search (vectorised version, 4.50+) step for step, so the same
settings return the same token ids (tested):
- each step scores every (beam, token) continuation by its summed log-probability (log-softmax,
  then history processors such as the n-gram ban) and keeps the top `2K` (more with several
  stop tokens), so K beams can continue even when the best candidates end;
- a candidate that ends (stop token, or the last allowed step) among the top K is a finished
  hypothesis scored `sum_logprobs / generated_len ** length_penalty` (Wu et al., 2016, simplified
  as in HF); the best K finished hypotheses are kept;
- `early_stopping=True` stops once K hypotheses are finished; False stops when the best running
  beam, scored at its current length, cannot beat the worst finished one; "never" uses the
  longest possible length for that bound when length_penalty > 0 (the canonical algorithm).
Stop tokens are not returned, as in `lmforge.generate.engine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lmforge.core.config import option
from lmforge.core.errors import ConfigError
from lmforge.generate.processors import History, LogitsProcessor, NoRepeatNGram, apply_processors
from lmforge.generate.prompt import check_prompt, fit_prompt, prefill_kwargs

BIG = 1.0e9  # HF's "impossible" score offset; kept identical so ties break the same way


@dataclass
class BeamParams:
    num_beams: int = option(4, "beam width K")
    length_penalty: float = option(1.0, "finished score = sum of log-probs / length ** length_penalty; "
                                        "> 0 favours longer, < 0 shorter outputs")
    early_stopping: bool | Literal["never"] = option(False, "True: stop when K hypotheses are finished; False: "
                                                            "stop when no running beam can beat them; never: "
                                                            "canonical bound")
    no_repeat_ngram_size: int = option(0, "never repeat an n-gram of this size; 0 is off")
    max_new_tokens: int = option(64, "most new tokens per hypothesis")
    num_return_sequences: int = option(1, "hypotheses returned, best first (<= num_beams)")
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ConfigError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], "
                              f"got {self.num_return_sequences}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Hypothesis:
    tokens: list[int]  # new tokens, stop token removed
    score: float  # sum of log-probs / generated_len ** length_penalty


def _better_than_finished(running_best: torch.Tensor, finished_scores: torch.Tensor, all_finished: bool,
                          length: int, length_penalty: float) -> bool:
    """HF's early-stop heuristic: could the best running beam, scored at `length`, beat the worst finished?"""
    worst = float(finished_scores.min()) if all_finished else -BIG
    return float(running_best / (length ** length_penalty)) > worst


@torch.no_grad()
def beam_search(model: nn.Module, prompt_ids: Sequence[int], params: BeamParams,
                processors: Sequence[LogitsProcessor] = ()) -> list[Hypothesis]:
    """The `num_return_sequences` best hypotheses for one prompt, best first. `processors` (applied to the
    log-probabilities, as HF does) come after the n-gram ban of `params`."""
    check_prompt(prompt_ids, model.cfg.vocab_size)
    prompt = fit_prompt(prompt_ids, model.context_length)
    K, L = params.num_beams, len(prompt)
    budget = min(params.max_new_tokens, model.context_length - L)
    procs = ([NoRepeatNGram(params.no_repeat_ngram_size)] if params.no_repeat_ngram_size else []) + list(processors)
    stop = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long)
    keep = max(2, 1 + len(stop)) * K
    top_k_mask = torch.arange(keep) < K
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(K, L + budget - 1)
        logits = model(torch.tensor([prompt] * K, device=device), cache=cache, start_pos=0,
                       **prefill_kwargs(model, K, L, device))[:, -1]
        running = torch.tensor([prompt] * K)  # [K, L + step]
        running_scores = torch.full((K,), -BIG)
        running_scores[0] = 0.0  # only the first beam expands at step 0, so beams start distinct
        finished = torch.full((K, L + budget), -1, dtype=torch.long)
        finished_len = torch.zeros(K, dtype=torch.long)
        finished_scores = torch.full((K,), -BIG)
        finished_flag = torch.zeros(K, dtype=torch.bool)
        improvable = True
        for step in range(budget):
            logp = torch.log_softmax(logits.float().cpu(), dim=-1)
            logp = apply_processors(logp, procs, History(running, L))
            V = logp.shape[-1]
            scores, idx = torch.topk((logp + running_scores[:, None]).flatten(), keep)
            parent, token = idx // V, idx % V
            candidates = torch.cat([running[parent], token[:, None]], dim=1)
            ends = torch.isin(token, stop) | (step + 1 == budget)
            # the K best candidates that did not end keep running
            live = scores + ends.float() * -BIG
            nxt = torch.topk(live, K).indices
            running, running_scores, order = candidates[nxt], live[nxt], parent[nxt]
            # candidates that ended among the top K become finished hypotheses if they beat the worst kept
            new_scores = scores / ((step + 1) ** params.length_penalty)
            if bool(finished_flag.all()) and params.early_stopping is True:
                new_scores = new_scores - BIG
            if not improvable:
                new_scores = new_scores - BIG
            new_scores = new_scores + (~(ends & top_k_mask)).float() * -BIG
            padded = torch.full((keep, L + budget), -1, dtype=torch.long)
            padded[:, : L + step + 1] = candidates
            merged_scores = torch.cat([finished_scores, new_scores])
            best = torch.topk(merged_scores, K).indices
            finished = torch.cat([finished, padded])[best]
            finished_len = torch.cat([finished_len, torch.full((keep,), step + 1)])[best]
            finished_flag = torch.cat([finished_flag, ends & top_k_mask])[best]
            finished_scores = merged_scores[best]
            if bool(ends.all()):
                break
            length = budget if params.early_stopping == "never" and params.length_penalty > 0 else step + 1
            improvable = improvable and _better_than_finished(
                running_scores[0], finished_scores, bool(finished_flag.all()), length, params.length_penalty)
            if not improvable or (bool(finished_flag.all()) and params.early_stopping is True):
                break
            cache.reorder(order.to(device))
            logits = model(running[:, -1:].to(device), cache=cache, start_pos=L + step)[:, -1]
    finally:
        model.train(was_training)
    out = []
    for row in range(params.num_return_sequences):
        toks = finished[row, L: L + int(finished_len[row])].tolist()
        if toks and toks[-1] in params.stop_token_ids:
            toks = toks[:-1]
        out.append(Hypothesis(toks, float(finished_scores[row])))
    return out
