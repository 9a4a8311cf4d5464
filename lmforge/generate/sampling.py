"""Logits processors and next-token sampling: small pure functions over [B, V] logits.

Each processor returns new logits with the tokens it removes set to -inf, so they compose in
any order and the final softmax renormalises over what is left. The order used by
`sample_next` (temperature, then top-k, then top-p) is the one HF transformers uses, so the
same settings give the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.config import option
from lmforge.errors import ConfigError


@dataclass
class SamplingParams:
    greedy: bool = option(False, "always take the most likely token (same as temperature 0)")
    temperature: float = option(1.0, "divide logits by this before sampling; <= 0 means greedy")
    top_k: int = option(0, "sample only among the k most likely tokens; 0 keeps all")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens whose mass reaches p")
    max_new_tokens: int = option(64, "stop after this many new tokens")
    seed: int | None = option(None, "seed of the sampling generator; None draws from torch's global RNG")
    stop_token_ids: list[int] = option(default_factory=list,
                                       help="stop when one of these is sampled (it is not returned)")

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature <= 0


def apply_temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """softmax(z / t): t < 1 sharpens the distribution, t > 1 flattens it."""
    if t <= 0:
        raise ValueError(f"temperature must be positive to scale logits, got {t} (use greedy decoding)")
    return logits / t


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row (Fan et al., 2018); k <= 0 or k >= V keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    top = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al., 2020, eq. 2): keep the smallest set of most likely tokens
    whose probability mass is >= p. A token is dropped when the mass strictly before it already
    reaches p, so the most likely token always survives."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p in that order (for a non-greedy `params`), in float32."""
    logits = apply_temperature(logits.float(), params.temperature)
    logits = top_k_filter(logits, params.top_k)
    return top_p_filter(logits, params.top_p)


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token of each row of `logits` [B, V] -> [B]; argmax when greedy or temperature <= 0."""
    if params.is_greedy:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(filtered_logits(logits, params), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
