"""Composable logits processors: pure functions over [B, V] logits plus the tokens seen so far.

A processor returns new logits; tokens it removes are set to -inf, so processors compose in
any order and the final softmax renormalises over what is left. History-dependent penalties
read a `History` ([B, T] token ids, -1 for left padding, and the column where generated tokens
begin). `processors_for` builds the list in HF transformers' order (penalties, n-gram ban, then
temperature, top-k, top-p, min-p), so the same settings give the same distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class History:
    """Tokens so far: `tokens` [B, T] (long, -1 = padding, ignored); columns >= `n_prompt` were generated."""

    tokens: torch.Tensor
    n_prompt: int

    @staticmethod
    def of(rows: Sequence[Sequence[int]], n_prompt: int, device: torch.device | str = "cpu") -> History:
        """Left-pad ragged rows with -1 (so generated tokens share columns); `n_prompt` counts from the right
        edge of the longest prompt."""
        width = max(len(r) for r in rows)
        ids = [[-1] * (width - len(r)) + list(r) for r in rows]
        return History(torch.tensor(ids, dtype=torch.long, device=device), n_prompt)

    def counts(self, vocab_size: int, generated_only: bool = False) -> torch.Tensor:
        """[B, V] float: how often each token occurs (in the generated part only, if asked)."""
        toks = self.tokens[:, self.n_prompt:] if generated_only else self.tokens
        out = torch.zeros(toks.shape[0], vocab_size, device=toks.device)
        valid = toks >= 0
        return out.scatter_add_(1, toks.clamp(min=0), valid.float())


class LogitsProcessor(Protocol):
    def __call__(self, logits: torch.Tensor, history: History | None) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------
# the math, one function per method


def apply_temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """softmax(z / t): t < 1 sharpens the distribution, t > 1 flattens it."""
    if t <= 0:
        raise ValueError(f"temperature must be positive to scale logits, got {t} (use greedy decoding)")
    return logits / t


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (Fan et al., 2018) and every logit tied with the k-th, as HF's
    `TopKLogitsWarper` does (a tie is never broken by index); k <= 0 or k >= V keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al., 2020, eq. 2): keep the smallest set of most likely tokens whose
    probability mass is >= p, computed as HF's `TopPLogitsWarper` does: sorted ascending, a token is dropped
    when the mass up to and including it is <= 1 - p; the most likely token always survives. Tokens tied at
    the boundary are resolved by the same stable ascending sort, so the kept set equals HF's."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False, stable=True)
    mass_upto = torch.softmax(sorted_logits.float(), dim=-1).cumsum(dim=-1)
    drop_sorted = mass_upto <= (1 - p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Min-p (Nguyen et al., 2024): drop tokens whose probability is below p times the top token's, so
    the cut-off scales with the model's confidence. p <= 0 keeps all; the top token always survives."""
    if p <= 0.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    return logits.masked_fill(probs < p * probs.max(dim=-1, keepdim=True).values, NEG_INF)


def repetition_penalty(logits: torch.Tensor, history: History, theta: float) -> torch.Tensor:
    """CTRL (Keskar et al., 2019, Sec. 4.1): every token already in the context (prompt included) has
    its logit divided by theta when positive and multiplied by theta when negative, so theta > 1 always
    makes it less likely."""
    if theta == 1.0:
        return logits
    seen = history.counts(logits.shape[-1]) > 0
    penalised = torch.where(logits < 0, logits * theta, logits / theta)
    return torch.where(seen, penalised, logits)


def frequency_presence_penalty(logits: torch.Tensor, history: History, frequency: float,
                               presence: float) -> torch.Tensor:
    """OpenAI's definition: mu[j] - c[j] * frequency - (c[j] > 0) * presence, where c[j] counts token j
    among the tokens generated so far (the prompt does not count, as in the OpenAI API and vLLM)."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    c = history.counts(logits.shape[-1], generated_only=True)
    return logits - c * frequency - (c > 0).to(logits.dtype) * presence


def banned_ngram_tokens(tokens: Sequence[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of `tokens`: those that followed an earlier occurrence of the
    last n-1 tokens."""
    if n <= 0 or len(tokens) + 1 < n:
        return []
    if n == 1:
        return sorted(set(tokens))
    tail = tuple(tokens[len(tokens) - n + 1:])
    return sorted({tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == tail})


def no_repeat_ngram(logits: torch.Tensor, history: History, n: int) -> torch.Tensor:
    """Ban every token that would make an n-gram occur twice in a row's context (Paulus et al., 2018)."""
    if n <= 0:
        return logits
    out = logits.clone()
    for row, toks in enumerate(history.tokens.tolist()):
        banned = banned_ngram_tokens([t for t in toks if t >= 0], n)
        if banned:
            out[row, banned] = NEG_INF
    return out


# ----------------------------------------------------------------------------------------------
# the same as composable objects


@dataclass(frozen=True)
class Temperature:
    t: float

    def __call__(self, logits: torch.Tensor, history: History | None) -> torch.Tensor:
        return apply_temperature(logits, self.t)


@dataclass(frozen=True)
class TopK:
    k: int

    def __call__(self, logits: torch.Tensor, history: History | None) -> torch.Tensor:
        return top_k_filter(logits, self.k)


@dataclass(frozen=True)
class TopP:
    p: float

    def __call__(self, logits: torch.Tensor, history: History | None) -> torch.Tensor:
        return top_p_filter(logits, self.p)


@dataclass(frozen=True)
class MinP:
    p: float

    def __call__(self, logits: torch.Tensor, history: History | None) -> torch.Tensor:
        return min_p_filter(logits, self.p)


def _need(history: History | None, name: str) -> History:
    if history is None:
        raise ValueError(f"{name} needs the tokens so far (a History)")
    return history


@dataclass(frozen=True)
class RepetitionPenalty:
    theta: float

    def __call__(self, logits: torch.Tensor, history: History | None) -> torch.Tensor:
        return repetition_penalty(logits, _need(history, "repetition penalty"), self.theta)


@dataclass(frozen=True)
class FrequencyPresencePenalty:
    frequency: float
    presence: float

    def __call__(self, logits: torch.Tensor, history: History | None) -> torch.Tensor:
        return frequency_presence_penalty(logits, _need(history, "frequency/presence penalty"),
                                          self.frequency, self.presence)


@dataclass(frozen=True)
class NoRepeatNGram:
    n: int

    def __call__(self, logits: torch.Tensor, history: History | None) -> torch.Tensor:
        return no_repeat_ngram(logits, _need(history, "no-repeat-n-gram"), self.n)


HISTORY_PROCESSORS = (RepetitionPenalty, FrequencyPresencePenalty, NoRepeatNGram)


def apply_processors(logits: torch.Tensor, processors: Sequence[LogitsProcessor],
                     history: History | None = None) -> torch.Tensor:
    for proc in processors:
        logits = proc(logits, history)
    return logits


def needs_history(processors: Sequence[LogitsProcessor]) -> bool:
    return any(isinstance(p, HISTORY_PROCESSORS) for p in processors)
