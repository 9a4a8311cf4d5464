"""Atomic file writes (write to a temp file in the same directory, fsync, then rename) and directory locks.

A process killed mid-write leaves either the old file or the new one, never half of one; `dir_lock` gives a
directory one owning process at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
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
    """Hex SHA-256 of a file's bytes (tokenizer and checkpoint identity checks), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# one owner per directory

LOCK_NAME = ".lock"
_held: dict[str, list[int]] = {}  # lock file -> [fd, depth, pid] of the locks this process holds


@contextlib.contextmanager
def dir_lock(directory: str | Path) -> Iterator[Path]:
    """Own `directory` (created if missing) for the block: `with dir_lock(run_dir): ...`.

    An exclusive `flock` on DIRECTORY/.lock, which holds the owner's pid. A second process asking for it gets one
    LmforgeError line naming the owner; the kernel drops the lock when its owner dies, however it dies, so the lock
    of a dead process is taken over (with a note). The same process may nest the lock (a command calling a library
    function that takes it too).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LmforgeError(f"{directory}: exists and is not a directory")
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmforgeError(f"{e.filename or directory}: cannot create ({e.strerror or e})") from None
    key = os.path.realpath(path)
    held = _held.get(key)
    if held is not None and held[2] == os.getpid():  # nested in this process
        held[1] += 1
        try:
            yield directory
        finally:
            held[1] -= 1
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise LmforgeError(f"{path}: cannot create the lock file ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _lock_owner(fd)
        os.close(fd)
        raise LmforgeError(f"{directory} is in use by another process ({owner}, holding {path}); wait for it to "
                           "finish, or use another directory") from None
    previous = _lock_owner(fd)
    if previous != "pid unknown":
        print(f"note: {directory}: taking over the lock of {previous}, which is no longer running",
              file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1, os.getpid()]
    try:
        yield directory
    finally:
        del _held[key]
        # Emptied, never deleted: a process that opened the file just before a delete would lock the old inode
        # while a third one locks a new file, and both would think they own the directory.
        os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


def _lock_owner(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"
