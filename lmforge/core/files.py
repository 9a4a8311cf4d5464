"""Atomic file writes: write to a temp file in the same directory, fsync, then rename.

A process killed mid-write leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.core.errors import LmforgeError


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then atomically move the result to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold an object; any problem is one LmforgeError line naming the file."""

    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path}: not valid UTF-8 (byte offset {e.start})") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a JSON object at the top level")
    return data


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (tokenizer and checkpoint identity checks)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
