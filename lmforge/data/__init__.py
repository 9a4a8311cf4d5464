"""Data stages: readers, the cleaning pipeline, tokenization into shards.

`lmforge.data.Pipeline` and `lmforge.data.clean_documents` load lazily, so importing a reader does not
pull in the pipeline's dependencies.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"Pipeline": "lmforge.data.pipeline", "clean_documents": "lmforge.data.pipeline",
         "default_steps": "lmforge.data.pipeline", "make_step": "lmforge.data.pipeline"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge.data' has no attribute '{name}'")
