"""Token shards: the stable on-disk format between tokenization and training.

Format `lmforge-shards/1` (all integers little-endian)::

    DIR/index.json       {"format": "lmforge-shards/1", "dtype": "uint16" | "uint32", "vocab_size": int,
                          "tokenizer_sha256": str, "eos_id": int | null,
                          "n_tokens": int, "n_docs": int,
                          "n_bytes": int,          # UTF-8 bytes of the source text (for bits-per-byte)
                          "shards": [{"tokens": "shard_00000.bin", "doc_ends": "shard_00000.idx",
                                      "n_tokens": int, "n_docs": int, "n_bytes": int}, ...]}
    DIR/shard_00000.bin  raw token ids: uint16 when vocab_size <= 65536, else uint32
    DIR/shard_00000.idx  uint64: exclusive end offset, within the shard, of each document ending in it

The shards concatenate into one token stream. Every shard but the last holds exactly
`max_shard_tokens` tokens, so a document may start in one shard and end in the next: it is listed
(and its bytes counted) in the shard where it ends. The writer inserts no separators; callers
append `eos_id` to each document themselves. `index.json` is written last and atomically, so a
directory with a valid index always holds complete shards.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json, read_json_object

FORMAT = "lmforge-shards/1"
INDEX_NAME = "index.json"
DOC_END_DTYPE = np.dtype("<u8")
_SHARD_FILE = re.compile(r"shard_\d{5,}\.(bin|idx)")
_FLUSH_TOKENS = 1 << 20  # buffer ~1M tokens in memory between writes


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned dtype that holds every id below `vocab_size`."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_names(i: int) -> tuple[str, str]:
    return f"shard_{i:05d}.bin", f"shard_{i:05d}.idx"


class ShardWriter:
    """Append documents (lists of token ids) to a shard directory; `close()` writes `index.json`.

    Tokens are buffered and written in large chunks; a new shard starts every `max_shard_tokens`.
    Opening a writer on a directory removes its old index and shard files first, so a crash
    mid-write can never leave an index pointing at a mix of old and new shards.
    """

    def __init__(self, directory: str | Path, vocab_size: int, tokenizer_sha256: str = "",
                 eos_id: int | None = None, max_shard_tokens: int = 100_000_000) -> None:
        if vocab_size <= 0 or vocab_size > 1 << 32:
            raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
        if max_shard_tokens <= 0:
            raise ValueError(f"max_shard_tokens must be positive, got {max_shard_tokens}")
        if eos_id is not None and not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
        self.directory = Path(directory)
        self.vocab_size = vocab_size
        self.tokenizer_sha256 = tokenizer_sha256
        self.eos_id = eos_id
        self.max_shard_tokens = max_shard_tokens
        self.dtype = token_dtype(vocab_size)
        clear_shard_dir(self.directory)
        self._shards: list[dict[str, Any]] = []
        self._buffer: list[np.ndarray] = []  # token chunks not yet written to the open shard
        self._buffered = 0
        self._file: Any = None  # the open .bin of the current shard
        self._shard_tokens = 0  # tokens in the current shard, written or buffered
        self._doc_ends: list[int] = []  # ends (within the current shard) of documents ending in it
        self._shard_bytes = 0
        self._closed = False
        self._index: dict[str, Any] | None = None

    def add(self, ids: Sequence[int] | np.ndarray, n_bytes: int = 0) -> None:
        """Append one document; `n_bytes` is the UTF-8 length of its source text (0 if unknown)."""
        if self._closed:
            raise ValueError("ShardWriter.add() after close()")
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if n_bytes < 0:
            raise ValueError(f"n_bytes must be >= 0, got {n_bytes}")
        arr = np.array(arr, dtype=self.dtype)  # a copy: the caller may reuse its buffer
        while True:  # split the document where shards fill up
            room = self.max_shard_tokens - self._shard_tokens
            if arr.size < room or (arr.size == room and room > 0):
                self._append(arr)
                break
            self._append(arr[:room])
            arr = arr[room:]
            self._finish_shard()
        self._doc_ends.append(self._shard_tokens)
        self._shard_bytes += n_bytes

    def close(self) -> dict[str, Any]:
        """Flush the last shard and atomically write `index.json`; returns the index. Idempotent."""
        if self._index is not None:
            return self._index
        if self._shard_tokens or self._doc_ends or not self._shards:
            self._finish_shard()
        self._closed = True
        self._index = write_index(self.directory, self.vocab_size, self.tokenizer_sha256, self.eos_id, self._shards)
        return self._index

    def abort(self) -> None:
        """Stop without an index: the directory is not a readable shard set afterwards."""
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals ---------------------------------------------------------------------------

    def _append(self, chunk: np.ndarray) -> None:
        if chunk.size == 0:
            return
        self._buffer.append(chunk)
        self._buffered += chunk.size
        self._shard_tokens += chunk.size
        if self._buffered >= _FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._file is None:
            self._file = open(self.directory / shard_names(len(self._shards))[0], "wb")
        if self._buffer:
            self._file.write(np.concatenate(self._buffer).tobytes())
        self._buffer, self._buffered = [], 0

    def _finish_shard(self) -> None:
        self._flush()
        self._file.close()
        self._file = None
        tokens_name, ends_name = shard_names(len(self._shards))
        np.asarray(self._doc_ends, dtype=DOC_END_DTYPE).tofile(self.directory / ends_name)
        self._shards.append({"tokens": tokens_name, "doc_ends": ends_name, "n_tokens": self._shard_tokens,
                             "n_docs": len(self._doc_ends), "n_bytes": self._shard_bytes})
        self._shard_tokens, self._doc_ends, self._shard_bytes = 0, [], 0


def clear_shard_dir(directory: Path) -> None:
    """Create `directory`, removing an old index first and then old shard files (never other files)."""
    if directory.exists() and not directory.is_dir():
        raise LmforgeError(f"{directory}: exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / INDEX_NAME).unlink(missing_ok=True)
    for old in directory.iterdir():
        if _SHARD_FILE.fullmatch(old.name):
            old.unlink(missing_ok=True)


def write_index(directory: Path, vocab_size: int, tokenizer_sha256: str, eos_id: int | None,
                shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Atomically write `index.json` for shard entries already on disk; returns the index."""
    index = {
        "format": FORMAT,
        "dtype": token_dtype(vocab_size).name,
        "vocab_size": vocab_size,
        "tokenizer_sha256": tokenizer_sha256,
        "eos_id": eos_id,
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "n_docs": sum(s["n_docs"] for s in shards),
        "n_bytes": sum(s["n_bytes"] for s in shards),
        "shards": shards,
    }
    atomic_write_json(directory / INDEX_NAME, index)
    return index


def shard_layout(doc_lengths: np.ndarray, max_shard_tokens: int) -> list[tuple[int, int, int]]:
    """How documents of these (positive) lengths, in stream order, are cut into shards, exactly as ShardWriter
    cuts them: every shard but the last holds `max_shard_tokens` tokens, and a document is listed in the shard
    where it ends. For each shard: (first document overlapping it, one past the last overlapping it, one past
    the last ending in it); the documents ending in it are [first, third)."""
    ends = np.cumsum(doc_lengths, dtype=np.int64)
    starts = ends - np.asarray(doc_lengths, dtype=np.int64)
    n_tokens = int(ends[-1]) if ends.size else 0
    layout = []
    for i in range(max(1, -(-n_tokens // max_shard_tokens))):
        lo, hi = i * max_shard_tokens, min((i + 1) * max_shard_tokens, n_tokens)
        layout.append((int(np.searchsorted(ends, lo, side="right")), int(np.searchsorted(starts, hi, side="left")),
                       int(np.searchsorted(ends, hi, side="right"))))
    return layout


def write_shard(directory: Path, shard: int, dtype: np.dtype, pieces: Sequence[np.ndarray], doc_ends: np.ndarray,
                n_bytes: int) -> dict[str, Any]:
    """Write one shard's token file (the concatenated `pieces`) and doc-ends file; returns its index entry."""
    tokens_name, ends_name = shard_names(shard)
    n_tokens = 0
    with open(directory / tokens_name, "wb") as f:
        for piece in pieces:
            f.write(np.ascontiguousarray(piece, dtype=dtype).tobytes())
            n_tokens += len(piece)
    np.asarray(doc_ends, dtype=DOC_END_DTYPE).tofile(directory / ends_name)
    return {"tokens": tokens_name, "doc_ends": ends_name, "n_tokens": n_tokens, "n_docs": len(doc_ends),
            "n_bytes": int(n_bytes)}


class ShardSet:
    """Read-only view of a shard directory: shards are memory-mapped, reads may span shards."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = _read_index(self.directory / INDEX_NAME)
        self.index = index
        self.vocab_size: int = index["vocab_size"]
        self.tokenizer_sha256: str = index["tokenizer_sha256"]
        self.eos_id: int | None = index["eos_id"]
        self.n_tokens: int = index["n_tokens"]
        self.n_docs: int = index["n_docs"]
        self.n_bytes: int = index["n_bytes"]
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self._tokens: list[np.ndarray] = []
        for entry in index["shards"]:
            path = self.directory / entry["tokens"]
            _check_size(path, entry["n_tokens"] * self.dtype.itemsize, f"{entry['n_tokens']} tokens")
            _check_size(self.directory / entry["doc_ends"], entry["n_docs"] * DOC_END_DTYPE.itemsize,
                        f"{entry['n_docs']} document ends")
            self._tokens.append(np.memmap(path, dtype=self.dtype, mode="r") if entry["n_tokens"]
                                else np.empty(0, self.dtype))
        sizes = [entry["n_tokens"] for entry in index["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # global offset of each shard
        self._doc_ends: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (f"ShardSet({str(self.directory)!r}, n_tokens={self.n_tokens}, n_docs={self.n_docs}, "
                f"shards={len(self._tokens)}, vocab_size={self.vocab_size})")

    @property
    def bytes_per_token(self) -> float:
        """Source-text UTF-8 bytes per token; 0.0 when the writer was not told the byte counts."""
        return self.n_bytes / self.n_tokens if self.n_tokens else 0.0

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated stream as an int64 copy."""
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise IndexError(f"read [{start}, {start + length}) outside the {self.n_tokens} tokens of "
                             f"{self.directory}")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            local = start + done - int(self._starts[shard])
            take = min(length - done, len(self._tokens[shard]) - local)
            out[done:done + take] = self._tokens[shard][local:local + take]
            done += take
            shard += 1
        return out

    def doc_ends(self) -> np.ndarray:
        """Global exclusive end offset of every document (uint64, non-decreasing, last == n_tokens)."""
        if self._doc_ends is None:
            parts = []
            for entry, start in zip(self.index["shards"], self._starts):
                path = self.directory / entry["doc_ends"]
                ends = np.fromfile(path, dtype=DOC_END_DTYPE)
                if ends.size and (np.any(np.diff(ends.astype(np.int64)) < 0) or ends[-1] > entry["n_tokens"]):
                    raise LmforgeError(f"{path}: document ends are not sorted within the shard's "
                                       f"{entry['n_tokens']} tokens (corrupted shard)")
                parts.append(ends + np.uint64(start))
            self._doc_ends = np.concatenate(parts) if parts else np.empty(0, DOC_END_DTYPE)
        return self._doc_ends


def _check_size(path: Path, expected: int, what: str) -> None:
    if not path.is_file():
        raise LmforgeError(f"{path}: shard file missing")
    size = path.stat().st_size
    if size != expected:
        raise LmforgeError(f"{path}: {size} bytes, but the index says {what} ({expected} bytes); "
                           "the shard is truncated or corrupted")


def _read_index(path: Path) -> dict[str, Any]:
    """Load and validate index.json; every problem is one LmforgeError line naming the file."""
    if not path.is_file():
        raise LmforgeError(f"{path}: no shard index (is {path.parent} a token shard directory?)")
    index = read_json_object(path)
    if index.get("format") != FORMAT:
        raise LmforgeError(f"{path}: format is {index.get('format')!r}, expected {FORMAT!r}")
    if index.get("dtype") not in ("uint16", "uint32"):
        raise LmforgeError(f"{path}: field 'dtype' must be 'uint16' or 'uint32', got {index.get('dtype')!r}")
    for key in ("vocab_size", "n_tokens", "n_docs", "n_bytes"):
        if not _is_count(index.get(key)):
            raise LmforgeError(f"{path}: field '{key}' must be a non-negative integer, "
                               f"got {index.get(key)!r}")
    too_narrow = np.dtype(index["dtype"]).itemsize < token_dtype(index["vocab_size"]).itemsize
    if index["vocab_size"] == 0 or too_narrow:
        raise LmforgeError(f"{path}: dtype {index['dtype']} does not fit vocab_size {index['vocab_size']}")
    if not isinstance(index.get("tokenizer_sha256", ""), str):
        raise LmforgeError(f"{path}: field 'tokenizer_sha256' must be a string")
    index.setdefault("tokenizer_sha256", "")
    eos = index.setdefault("eos_id", None)
    if eos is not None and not (_is_count(eos) and eos < index["vocab_size"]):
        raise LmforgeError(f"{path}: field 'eos_id' must be null or an id below vocab_size, got {eos!r}")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise LmforgeError(f"{path}: field 'shards' must be a list")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise LmforgeError(f"{path}: shards[{i}] must be an object")
        for key in ("tokens", "doc_ends"):
            name = entry.get(key)
            if not isinstance(name, str) or not name or Path(name).name != name:
                raise LmforgeError(f"{path}: shards[{i}].{key} must be a file name in the directory, "
                                   f"got {name!r}")
        for key in ("n_tokens", "n_docs", "n_bytes"):
            if not _is_count(entry.get(key)):
                raise LmforgeError(f"{path}: shards[{i}].{key} must be a non-negative integer, "
                                   f"got {entry.get(key)!r}")
    for key in ("n_tokens", "n_docs", "n_bytes"):
        total = sum(entry[key] for entry in shards)
        if total != index[key]:
            raise LmforgeError(f"{path}: field '{key}' is {index[key]} but the shards sum to {total}")
    return index


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
