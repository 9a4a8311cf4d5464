"""A real corpus found on every machine with Python: the standard library's code and documentation.

Two sources, interleaved document by document so any size cut holds both: `stdlib-code` (each
stdlib module's source) and `pydoc-topics` (the English reference text behind `help()`). The order
is deterministic for a given Python version, so the quickstart is reproducible with no download.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write
from lmforge.data.readers import read_documents

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                       "__pycache__"})
MAX_FILE_BYTES = 200_000  # generated tables and giant modules are not representative text


def stdlib_code_documents(stdlib: Path | None = None) -> Iterator[dict[str, Any]]:
    """Each UTF-8 `.py` file of the standard library (sorted by path), tests and vendored code skipped."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    for path in sorted(_python_files(root)):
        rel = path.relative_to(root).as_posix()
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield {"id": f"stdlib/{rel}", "text": text, "metadata": {"source": "stdlib-code", "path": rel}}


def _python_files(root: Path) -> Iterator[Path]:
    """`.py` files under `root`, never descending into SKIP_DIRS (site-packages can be huge)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        yield from (Path(dirpath, f) for f in filenames if f.endswith(".py"))


def pydoc_topic_documents() -> Iterator[dict[str, Any]]:
    """The reference-manual topics `help()` shows (pydoc_data.topics), one document each, sorted."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield {"id": f"pydoc/{name}", "text": topics[name],
               "metadata": {"source": "pydoc-topics", "topic": name}}


def interleave(*sources: Iterable[Any]) -> Iterator[Any]:
    """Round-robin over the sources until all are exhausted."""
    iterators = [iter(s) for s in sources]
    while iterators:
        alive = []
        for it in iterators:
            item = next(it, None)
            if item is not None:
                alive.append(it)
                yield item
        iterators = alive


def build_stdlib_corpus(output: str | Path, max_bytes: int = 20_000_000) -> dict[str, Any]:
    """Write the stdlib corpus as JSONL to `output`, stopping before `max_bytes` of text is exceeded.

    Returns {"path", "docs", "bytes", "by_source": {source: {"docs", "bytes"}}}.
    """
    if max_bytes <= 0:
        raise LmforgeError(f"max_bytes must be positive, got {max_bytes}")
    output = Path(output)
    stats: dict[str, Any] = {"path": str(output), "docs": 0, "bytes": 0, "by_source": {}}

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in interleave(pydoc_topic_documents(), stdlib_code_documents()):
                n_bytes = len(doc["text"].encode("utf-8"))
                if stats["bytes"] + n_bytes > max_bytes:
                    break
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                source = stats["by_source"].setdefault(doc["metadata"]["source"], {"docs": 0, "bytes": 0})
                for counts in (stats, source):
                    counts["docs"] += 1
                    counts["bytes"] += n_bytes
        if not stats["docs"]:  # raised inside the write, so no empty corpus file is left behind
            raise LmforgeError(f"no stdlib document fits in max_bytes={max_bytes}")

    atomic_write(output, write)
    return stats


def split_by_source(corpus: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write each document of `corpus` to OUT_DIR/<source>.jsonl by its `metadata.source` ("other" when unset),
    so a mixture can weight the sources; returns {source: path}, sorted by source name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    try:
        for doc in read_documents([corpus]):
            name = str(doc.metadata.get("source") or "other").replace("/", "-")
            if name not in files:
                files[name] = open(out_dir / f"{name}.jsonl", "w", encoding="utf-8")
            files[name].write(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")
    finally:
        for f in files.values():
            f.close()
    return {name: out_dir / f"{name}.jsonl" for name in sorted(files)}
