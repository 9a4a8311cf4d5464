"""Exact de-duplication: a 128-bit xxhash of each document's text; the first copy (in shard order) stays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from lmforge.core.config import option
from lmforge.data.readers import Document
from lmforge.data.steps import Barrier


@dataclass
class ExactDedup(Barrier):
    """Remove documents whose (optionally whitespace-normalized) text equals an earlier one's."""

    name = "exact_dedup"
    normalize_whitespace: bool = option(False, help="compare texts with runs of whitespace collapsed")

    def key(self, doc: Document) -> int:
        text = " ".join(doc.text.split()) if self.normalize_whitespace else doc.text
        return xxhash.xxh3_128_intdigest(text.encode("utf-8", "surrogatepass"))

    def resolve(self, keys: Sequence[list[Any]], ids: Sequence[list[str]]) -> list[Any]:
        first: dict[int, str] = {}
        plans = []
        for shard_keys, shard_ids in zip(keys, ids):
            drop = {}
            for i, (k, doc_id) in enumerate(zip(shard_keys, shard_ids)):
                if k in first:
                    drop[i] = first[k]
                else:
                    first[k] = doc_id
            plans.append(drop)
        return plans

    def apply(self, doc: Document, index: int, plan: dict[int, str]) -> str | None:
        if index not in plan:
            return None
        doc.metadata["duplicate_of"] = plan[index]
        return "exact_duplicate"
