"""One model config derived from another: the fields a model was built with, and a user's changes carried
from one preset over to another (`quickstart --arch moe --pretrain.model.d_model 64` is moe-tiny at d_model 64)."""

from __future__ import annotations

from typing import Any

from lmforge.core.config import from_dict, to_dict
from lmforge.model.config import ModelConfig


def model_fields(cfg: ModelConfig) -> dict[str, Any]:
    """Every resolved field but `preset`: the preset's values are already in them."""
    data = to_dict(cfg)
    data.pop("preset", None)
    return data


def with_fields(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    """`cfg` with some fields changed, validated again (e.g. the vocabulary an objective's sentinels widen)."""
    return from_dict(ModelConfig, {**model_fields(cfg), **changes})


def rebase_preset(cfg: ModelConfig, preset: str, base: str) -> ModelConfig:
    """Preset `preset` with the fields in which `cfg` differs from preset `base` on top."""
    base_fields = model_fields(from_dict(ModelConfig, {"preset": base}))
    changed = {k: v for k, v in model_fields(cfg).items() if base_fields.get(k) != v}
    return from_dict(ModelConfig, {"preset": preset, **changed})
