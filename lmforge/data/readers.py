"""Read documents from JSONL (plain, .gz, .zst) and text files, one streamed `Document` at a time.

Every stage that takes text (tokenizer training, tokenization, data pipelines) reads it here, so a
malformed input fails the same way everywhere: one `LmforgeError` line naming `file:line` and the
problem. All per-record checks go through `parse_jsonl_line`, which raises `BadRecord`; a
"rejects" mode only has to catch that one exception around it and keep going.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lmforge.errors import LmforgeError

JSONL_SUFFIXES = (".jsonl", ".json")
COMPRESSED_SUFFIXES = (".gz", ".zst")


@dataclass
class Document:
    """One unit of text; `source` says where it came from ("path:line" for JSONL, "path" for text)."""

    id: str
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


class BadRecord(LmforgeError):
    """A record that cannot be read; `source` is "path:line", `problem` says why."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


def read_documents(paths: Sequence[str | Path], text_field: str = "text",
                   id_field: str = "id") -> Iterator[Document]:
    """Stream documents from files and directories (walked recursively, sorted, hidden files skipped)."""
    for path in iter_input_files(paths):
        if is_jsonl(path):
            yield from read_jsonl(path, text_field, id_field)
        else:
            yield read_text_file(path)


def iter_input_files(paths: Sequence[str | Path]) -> Iterator[Path]:
    if isinstance(paths, (str, Path)):  # a lone path is a common slip; treat it as a list of one
        paths = [paths]
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and not _is_hidden(f.relative_to(p)))
        elif p.is_file():
            yield p
        else:
            raise LmforgeError(f"{p}: no such file or directory")


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def is_jsonl(path: Path) -> bool:
    """`.jsonl`/`.json`, optionally compressed (`.jsonl.gz`, `.jsonl.zst`): one record per line."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in JSONL_SUFFIXES


def open_binary(path: Path) -> IO[bytes]:
    """Open for reading bytes, decompressing `.gz` and `.zst` on the fly."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise LmforgeError(f"{path}: reading .zst files needs the zstandard package "
                               "(pip install zstandard)") from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def read_jsonl(path: Path, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """One document per non-blank line, streamed (the file is never held in memory)."""
    with open_binary(path) as f:
        for lineno, raw in _numbered_lines(f, path):
            if raw.strip():
                yield parse_jsonl_line(raw, f"{path}:{lineno}", text_field, id_field)


def _numbered_lines(f: IO[bytes], path: Path) -> Iterator[tuple[int, bytes]]:
    """Lines of a possibly compressed stream; a corrupt archive is one LmforgeError naming the line."""
    lineno = 0
    try:
        for raw in f:
            lineno += 1
            yield lineno, raw
    except decompress_errors() as e:
        raise LmforgeError(f"{path}:{lineno + 1}: cannot decompress ({e})") from None


def decompress_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or corrupt .gz/.zst raises while being read (gzip.BadGzipFile is an OSError)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard
    except ImportError:
        return errors
    return (*errors, zstandard.ZstdError)


def parse_jsonl_line(raw: bytes, source: str, text_field: str = "text", id_field: str = "id") -> Document:
    """Decode and validate one JSONL record; every problem raises `BadRecord(source, problem)`.

    Keys other than text and id go to `metadata` (a nested "metadata" object is merged in).
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(source, f"not valid UTF-8 (byte offset {e.start} in the line)") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(source, f"malformed JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise BadRecord(source, f"expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise BadRecord(source, f"missing text field '{text_field}'")
    text = record[text_field]
    if not isinstance(text, str):
        raise BadRecord(source, f"field '{text_field}' must be a string, got {type(text).__name__}")
    _check_encodable(text, source, text_field)
    doc_id = record.get(id_field)
    metadata = dict(record["metadata"]) if isinstance(record.get("metadata"), dict) else {}
    metadata.update((k, v) for k, v in record.items()
                    if k not in (text_field, id_field) and not (k == "metadata" and isinstance(v, dict)))
    return Document(id=source if doc_id is None else str(doc_id), text=text, source=source, metadata=metadata)


def _check_encodable(text: str, source: str, text_field: str) -> None:
    """JSON escapes can smuggle in lone surrogates (\\ud800), which no UTF-8 consumer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecord(source, f"field '{text_field}' is not valid UTF-8: unpaired surrogate at "
                                f"character {e.start}") from None


def read_text_file(path: Path) -> Document:
    """The whole file is one document (compressed `.gz`/`.zst` text is decompressed)."""
    with open_binary(path) as f:
        try:
            data = f.read()
        except decompress_errors() as e:
            raise LmforgeError(f"{path}: cannot decompress ({e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BadRecord(f"{path}:{line}", f"not valid UTF-8 (byte offset {e.start} in the file)") from None
    return Document(id=str(path), text=text, source=str(path))
