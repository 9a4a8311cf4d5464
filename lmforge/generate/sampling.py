"""Sampling settings and next-token choice: `SamplingParams` -> a list of logits processors -> a token.

The processors themselves (and their paper references) live in `lmforge.generate.processors`;
`processors_for` puts them in HF transformers' order: penalties and the n-gram ban first (they
apply to greedy decoding too), then temperature, top-k, top-p and min-p (sampling only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.core.config import option, require
from lmforge.generate.processors import (
    FrequencyPresencePenalty,
    History,
    LogitsProcessor,
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    apply_processors,
    apply_temperature,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)

__all__ = ["SamplingParams", "apply_temperature", "filtered_logits", "min_p_filter", "new_generator",
           "penalty_processors", "processors_for", "sample_next", "top_k_filter", "top_p_filter"]


@dataclass
class SamplingParams:
    """The one sampling config: every command that samples embeds it as `sampling` (`--sampling.temperature`),
    and every decode strategy reads its length, seed and stop tokens from it."""

    greedy: bool = option(False, "always take the most likely token (same as temperature 0)")
    temperature: float = option(1.0, "divide logits by this before sampling; <= 0 means greedy")
    top_k: int = option(0, "sample only among the k most likely tokens; 0 keeps all")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens whose mass reaches p")
    min_p: float = option(0.0, "drop tokens less likely than min_p times the most likely one; 0 keeps all")
    repetition_penalty: float = option(1.0, "CTRL penalty on tokens already in the context; 1 is off, > 1 "
                                            "discourages repeats")
    frequency_penalty: float = option(0.0, "OpenAI frequency penalty: subtract this times a token's count "
                                           "in the generated text")
    presence_penalty: float = option(0.0, "OpenAI presence penalty: subtract this from every token already "
                                          "generated")
    no_repeat_ngram_size: int = option(0, "never repeat an n-gram of this size; 0 is off")
    max_new_tokens: int = option(64, "stop after this many new tokens")
    seed: int | None = option(None, "seed of the sampling generator; None draws from torch's global RNG")
    stop_token_ids: list[int] = option(default_factory=list,
                                       help="stop when one of these is sampled (it is not returned)")

    def __post_init__(self) -> None:
        require(self.top_k >= 0, "top_k", self.top_k, ">= 0")
        require(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "in (0, 1]")
        require(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "in [0, 1]")
        require(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "> 0")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            require(-2.0 <= value <= 2.0, name, value, "in [-2, 2] (OpenAI's range)")
        require(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", self.no_repeat_ngram_size, ">= 0")
        require(self.max_new_tokens >= 0, "max_new_tokens", self.max_new_tokens, ">= 0")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature <= 0

    @property
    def needs_history(self) -> bool:
        """Whether choosing a token reads the tokens so far (penalties, n-gram ban)."""
        return bool(penalty_processors(self))


def penalty_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """The history-dependent processors `params` turns on (they change greedy choices too)."""
    procs: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(params.repetition_penalty))
    if params.frequency_penalty or params.presence_penalty:
        procs.append(FrequencyPresencePenalty(params.frequency_penalty, params.presence_penalty))
    if params.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGram(params.no_repeat_ngram_size))
    return procs


def processors_for(params: SamplingParams) -> list[LogitsProcessor]:
    """Every processor `params` turns on, in HF's order; the warpers only when sampling."""
    procs = penalty_processors(params)
    if not params.is_greedy:
        procs += [Temperature(params.temperature), TopK(params.top_k), TopP(params.top_p), MinP(params.min_p)]
    return procs


def filtered_logits(logits: torch.Tensor, params: SamplingParams, history: History | None = None) -> torch.Tensor:
    """`logits` [B, V] after every processor of `params`, in float32."""
    return apply_processors(logits.float(), processors_for(params), history)


def new_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """The seeded generator a decode loop samples with; None (torch's global RNG) without a seed."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | list[torch.Generator] | None = None,
                history: History | None = None) -> torch.Tensor:
    """Next token of each row of `logits` [B, V] -> [B]; argmax (after any penalties) when greedy.
    `history` (the tokens so far) is needed when `params.needs_history`. A list of k generators splits the rows
    into k equal consecutive blocks, each drawn from its own generator: a block's tokens then depend on its own
    rows and generator only, not on what else shares the batch."""
    logits = filtered_logits(logits, params, history)
    if params.is_greedy:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    if isinstance(generator, list):
        if len(probs) % len(generator):
            raise ValueError(f"{len(probs)} rows do not split into {len(generator)} equal blocks of generators")
        blocks = probs.split(len(probs) // len(generator))
        return torch.cat([torch.multinomial(b, 1, generator=g) for b, g in zip(blocks, generator)]).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
