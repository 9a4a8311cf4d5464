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


def current_umask() -> int:
    """The process umask, read without changing it where the OS shows it (Linux); elsewhere set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(directory: str | Path, name: str) -> tuple[int, str]:
    """An open temp file (fd, path) beside `name` in `directory`, with the mode `open()` would give it.

    `tempfile.mkstemp` creates 0600; output files follow the umask like every other tool's (0644 under 022).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.chmod(tmp, 0o666 & ~current_umask())
    return fd, tmp


def temp_dir(directory: str | Path, prefix: str) -> Path:
    """A new temp directory in `directory` with the mode `mkdir` would give it (mkdtemp's is 0700)."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=directory)
    os.chmod(tmp, 0o777 & ~current_umask())
    return Path(tmp)


def writable_dir(path: str | Path, key: str) -> Path:
    """Create `path` (with parents) as the directory a command writes into, checking that it can write there;
    a path that is a file, or that the OS refuses, is one `LmforgeError` line naming the option `key`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LmforgeError(f"{key}: {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LmforgeError(f"{key}: cannot write to {path} ({e.strerror or e})") from None
    return path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then atomically move the result to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, path.name)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # again: a writer may replace the file (safetensors makes it 0600)
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
