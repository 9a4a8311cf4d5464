"""Atomic JSONL writers (plain or zstd): lines go to a temp file that is renamed into place on `commit`,
so a killed shard leaves no half file that a resumed run could mistake for finished output."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import IO, Any

from lmforge.core.files import temp_file
from lmforge.data.readers import Document


def document_record(doc: Document, **extra: Any) -> dict[str, Any]:
    """The stable output shape: {"id", "text", "metadata"} plus any extra keys (rejects add step, reason)."""
    return {"id": doc.id, "text": doc.text, "metadata": doc.metadata, **extra}


class JsonlWriter:
    """Write records as JSON lines to `path` (zstd-compressed when it ends in .zst)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = temp_file(self.path.parent, self.path.name)
        raw: IO[bytes] = os.fdopen(fd, "wb")
        if self.path.suffix == ".zst":
            import zstandard

            raw = zstandard.ZstdCompressor(level=3).stream_writer(raw)
        self._f = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def commit(self) -> None:
        self._f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)
