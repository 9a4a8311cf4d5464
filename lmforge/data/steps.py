"""What a pipeline step is: a small dataclass that looks at one document and keeps, edits or rejects it.

Two kinds (datatrove's filter/dedup split, with dolma's rule that every decision carries a reason):
- `Step`: streaming. `step(doc)` returns None to keep the document (it may edit `doc.text` or
  `doc.metadata`) or a short reason string to reject it. It never sees other documents.
- `Barrier`: needs the whole corpus (global dedup). The executor calls `key(doc)` on every document
  of every shard, `resolve(keys_per_shard)` once, then `apply(doc, index, plan)` on each shard with
  that shard's plan. Steps after a barrier see only what it kept.
Steps are plain picklable dataclasses, so any executor (in-process, process pool, Ray) can run them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from lmforge.data.readers import Document


class Step:
    """A streaming step; subclasses are dataclasses whose fields are the recipe parameters."""

    name: ClassVar[str] = "step"
    modifies: ClassVar[bool] = False  # edits text: the report then counts characters removed

    def __call__(self, doc: Document) -> str | None:
        raise NotImplementedError

    def pop_counters(self) -> dict[str, int]:
        """Extra counts for the report (e.g. PII replacements) since the last call; summed over shards."""
        return {}


class Barrier(Step):
    """A step that decides on each document only after seeing every document (see module docstring)."""

    def key(self, doc: Document) -> Any:
        raise NotImplementedError

    def resolve(self, keys: Sequence[list[Any]], ids: Sequence[list[str]]) -> list[Any]:
        """One plan per shard from every shard's keys (and document ids, to name what a doc duplicates)."""
        raise NotImplementedError

    def apply(self, doc: Document, index: int, plan: Any) -> str | None:
        raise NotImplementedError
