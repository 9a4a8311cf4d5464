"""RoPE keys of HF configs, shared by every RoPE family: transformers 4.x (`rope_theta`, `rope_scaling`) and
5.x (`rope_parameters`) spellings in, both spellings out. The names of the RoPE types are the same on both
sides; a type or key lmforge does not compute raises rather than convert to different positions.
"""

from __future__ import annotations

import json
import math
from typing import Any

from lmforge.core.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.positions import yarn_mscale

# HF rope_type -> the rope_parameters keys it reads beside rope_type/rope_theta/factor, and the ModelConfig
# field each one fills.
ROPE_KEYS: dict[str, dict[str, str]] = {
    "default": {}, "linear": {}, "dynamic": {},
    "yarn": {"original_max_position_embeddings": "rope_original_max_seq_len", "beta_fast": "rope_beta_fast",
             "beta_slow": "rope_beta_slow"},
    "llama3": {"original_max_position_embeddings": "rope_original_max_seq_len",
               "low_freq_factor": "rope_low_freq_factor", "high_freq_factor": "rope_high_freq_factor"},
}
def rope_from_hf(hf: dict[str, Any], default_theta: float, max_len: int,
                 source: str = "HF config") -> dict[str, Any]:
    """ModelConfig `rope_*` values from transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`) keys, read as HF 5.x reads them (`rope_scaling` wins, llama3/yarn's original context
    defaults to max_position_embeddings). Dynamic NTK also gives `max_seq_len`: HF takes max_position_embeddings
    (`max_len`) as the original context and scales past it, so the model runs up to factor times that.
    A type or key lmforge does not compute (longrope, YaRN's mscale, partial rotary, ...) raises rather than
    convert to different positions."""
    params = hf.get("rope_parameters") or {}
    key, spec = ("rope_scaling", hf["rope_scaling"]) if hf.get("rope_scaling") else ("rope_parameters", params)
    rope_type = spec.get("rope_type", spec.get("type", "default")) if isinstance(spec, dict) else None

    def refuse(why: str) -> LmforgeError:
        return LmforgeError(f"{source}: {key} {json.dumps(spec)} is not supported yet ({why})")

    if rope_type not in ROPE_KEYS or any(isinstance(v, dict) for v in spec.values()):
        raise refuse(f"RoPE types: {', '.join(ROPE_KEYS)}")
    theta = spec.get("rope_theta", params.get("rope_theta", default_theta))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "default":
        return out
    fields = ROPE_KEYS[rope_type]
    extra = dict(spec)
    for known in ("rope_type", "type", "rope_theta", "factor", *fields):
        extra.pop(known, None)
    if extra.get("partial_rotary_factor", 1.0) == 1.0:
        extra.pop("partial_rotary_factor", None)
    if rope_type == "dynamic":  # HF's dynamic NTK measures from max_position_embeddings and ignores this
        extra.pop("original_max_position_embeddings", None)
    original = hf.get("original_max_position_embeddings") or spec.get("original_max_position_embeddings") or max_len
    factor = spec.get("factor") or (max_len / original if rope_type == "yarn" else None)
    if rope_type == "yarn":
        if extra.get("truncate", True) is True:
            extra.pop("truncate", None)
        if "attention_factor" in extra and extra["attention_factor"] == yarn_mscale(float(factor)):
            extra.pop("attention_factor")
    if extra:
        raise refuse(f"key '{sorted(extra)[0]}'")
    if factor is None:
        raise refuse("no 'factor'")
    out.update(rope_scaling=rope_type, rope_factor=float(factor))
    for hf_key, field in fields.items():
        if hf_key in spec:
            out[field] = spec[hf_key]
    if "rope_original_max_seq_len" in fields.values():
        out["rope_original_max_seq_len"] = int(original)
    if rope_type == "dynamic":  # the original context is max_position_embeddings; HF runs longer inputs
        out.update(rope_original_max_seq_len=max_len, max_seq_len=math.ceil(max_len * float(factor)))
    return out


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """`rope_parameters` (5.x), `rope_scaling` (4.x) and `max_position_embeddings` for cfg's RoPE. HF's
    dynamic NTK takes max_position_embeddings as the original context, so that is what it gets."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    max_len = cfg.max_seq_len
    if cfg.rope_scaling != "none":
        params.update(rope_type=cfg.rope_scaling, factor=cfg.rope_factor)
        original = cfg.rope_original_max_seq_len or cfg.max_seq_len
        for hf_key, field in ROPE_KEYS[cfg.rope_scaling].items():
            params[hf_key] = original if field == "rope_original_max_seq_len" else getattr(cfg, field)
        if cfg.rope_scaling == "dynamic":
            max_len = original
    scaling = {k: v for k, v in params.items() if k != "rope_theta"} if cfg.rope_scaling != "none" else None
    return {"max_position_embeddings": max_len, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
            "rope_parameters": params}
