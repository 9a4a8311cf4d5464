"""Named sampling presets: practical settings for common jobs, printed when used so nothing is hidden.

- `precise`: greedy with a mild CTRL repetition penalty, for factual answers and extraction.
- `balanced`: temperature 0.7, top-k 40, top-p 0.9 and the same penalty (the usual chat default).
- `creative`: temperature 1.0 with min-p 0.05 (Nguyen et al., 2024: min-p keeps high temperatures
  coherent) and OpenAI-style presence/frequency penalties that push toward new words.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmforge.core.config import suggest
from lmforge.core.errors import ConfigError
from lmforge.generate.sampling import SamplingParams

PRESETS: dict[str, dict[str, Any]] = {
    "precise": dict(greedy=True, repetition_penalty=1.1),
    "balanced": dict(greedy=False, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1),
    "creative": dict(greedy=False, temperature=1.0, top_k=0, top_p=1.0, min_p=0.05, presence_penalty=0.3,
                     frequency_penalty=0.3),
}


def preset_settings(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        hint = suggest(name, list(PRESETS))
        raise ConfigError(f"unknown sampling preset '{name}'" + (f" (did you mean '{hint}'?)" if hint else "")
                          + f"; choose from {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def apply_preset(params: SamplingParams, name: str, keep: frozenset[str] = frozenset()) -> SamplingParams:
    """`params` with preset `name`'s settings, except the fields in `keep` (set explicitly by the user)."""
    settings = {k: v for k, v in preset_settings(name).items() if k not in keep}
    return dataclasses.replace(params, **settings)


def describe_preset(name: str) -> str:
    """One line naming every setting the preset changes, e.g. for the terminal."""
    return f"preset {name}: " + " ".join(f"{k}={v}" for k, v in preset_settings(name).items())
