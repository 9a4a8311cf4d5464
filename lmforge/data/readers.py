"""Read documents from JSONL (plain, .gz, .zst), Parquet, WARC/WET and text files, one streamed `Document` at a time.

Every stage that takes text (tokenizer training, tokenization, data pipelines) reads it here, so a
malformed input fails the same way everywhere: one `LmforgeError` line naming `file:line` and the
problem. All per-record checks go through `parse_jsonl_line`/`record_to_document`, which raise
`BadRecord`; `iter_records` yields those instead of raising, so a "rejects" mode (the cleaning
pipeline) keeps going and sends each bad record to its rejects file.

Invalid UTF-8 is rejected by default; `invalid_utf8="repair"` decodes with U+FFFD replacements
and counts them in `metadata["utf8_repaired"]`.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from lmforge.core.errors import LmforgeError
from lmforge.data import wiki

JSONL_SUFFIXES = (".jsonl", ".json")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".bz2")
PARQUET_SUFFIXES = (".parquet", ".pq")
WARC_SUFFIXES = (".warc", ".wet", ".arc")
WIKI_SUFFIXES = (".xml",)
InvalidUTF8 = Literal["reject", "repair"]


@dataclass
class Document:
    """One unit of text; `source` says where it came from ("path:line" for JSONL, "path" for text)."""

    id: str
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


class BadRecord(LmforgeError):
    """A record that cannot be read; `source` is "path:line", `problem` says why."""

    def __init__(self, source: str, problem: str, raw: str = "") -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem
        self.raw = raw  # the record as text (undecodable bytes replaced), kept so a rejects file loses nothing


def read_documents(paths: Sequence[str | Path], text_field: str = "text", id_field: str = "id",
                   invalid_utf8: InvalidUTF8 = "reject") -> Iterator[Document]:
    """Stream documents from files and directories (walked recursively, sorted, hidden files skipped).

    The first bad record raises `BadRecord`; use `iter_records` to get them as values instead.
    """
    for path in iter_input_files(paths):
        for item in iter_records(path, text_field, id_field, invalid_utf8):
            if isinstance(item, BadRecord):
                raise item
            yield item


def iter_records(path: Path, text_field: str = "text", id_field: str = "id",
                 invalid_utf8: InvalidUTF8 = "reject", part: InputPart | None = None) -> Iterator[Document | BadRecord]:
    """Every record of one file by format: a Document, or a BadRecord for one that cannot be read.

    `part` (from `split_input`) limits it to one byte range of a JSONL file or a run of Parquet row groups.
    File-level failures (a corrupt archive, an unreadable Parquet footer) still raise LmforgeError.
    """
    if is_jsonl(path):
        yield from read_jsonl(path, text_field, id_field, invalid_utf8, bad="yield", part=part)
    elif is_parquet(path):
        yield from read_parquet(path, text_field, id_field, part=part)
    elif is_wiki_xml(path):
        yield from read_wiki_xml(path)
    elif is_warc(path):
        yield from read_warc(path)
    else:
        try:
            yield read_text_file(path, invalid_utf8)
        except BadRecord as e:
            yield e


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


def _base_suffix(path: Path) -> str:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def is_warc(path: Path) -> bool:
    """`.warc`/`.wet`/`.arc`, optionally gzipped (warcio reads both)."""
    return _base_suffix(path) in WARC_SUFFIXES


def is_wiki_xml(path: Path) -> bool:
    """`.xml` (optionally .gz/.bz2/.zst): a MediaWiki dump such as enwiki-...-pages-articles.xml.bz2."""
    return _base_suffix(path) in WIKI_SUFFIXES


def open_binary(path: Path) -> IO[bytes]:
    """Open for reading bytes, decompressing `.gz`, `.bz2` and `.zst` on the fly."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".bz2":
        return io.BufferedReader(bz2.open(path, "rb"))
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise LmforgeError(f"{path}: reading .zst files needs the zstandard package "
                               "(pip install zstandard)") from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def read_jsonl(path: Path, text_field: str = "text", id_field: str = "id", invalid_utf8: InvalidUTF8 = "reject",
               bad: Literal["raise", "yield"] = "raise", part: InputPart | None = None) -> Iterator[Any]:
    """One document per non-blank line, streamed (the file is never held in memory).

    `bad="yield"` yields a BadRecord for a line that cannot be read and goes on with the next.
    `part`: only the lines that start inside its byte range (numbered as in the whole file).
    """
    with open_binary(path) as f:
        lines = _numbered_lines(f, path) if part is None or part.whole else _range_lines(f, part)
        for lineno, raw in lines:
            if raw.strip():
                try:
                    yield parse_jsonl_line(raw, f"{path}:{lineno}", text_field, id_field, invalid_utf8)
                except BadRecord as e:
                    if bad == "raise":
                        raise
                    e.raw = raw.decode("utf-8", "replace").rstrip("\r\n")
                    yield e


def read_parquet(path: Path, text_field: str = "text", id_field: str = "id", batch_rows: int = 1024,
                 part: InputPart | None = None) -> Iterator[Document | BadRecord]:
    """One document per row, read a row group batch at a time; the source is "path:row" (1-based).

    `part`: only row groups [part.start, part.end) (rows numbered as in the whole file)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses for a bad footer
        raise LmforgeError(f"{path}: cannot read Parquet file ({str(e).splitlines()[0]})") from None
    if text_field not in pf.schema_arrow.names:
        raise LmforgeError(f"{path}: no column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)})")
    groups = None if part is None or part.whole else list(range(part.start, part.end))
    row = 0 if groups is None else sum(pf.metadata.row_group(g).num_rows for g in range(part.start))
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups):
        for record in batch.to_pylist():
            row += 1
            try:
                yield record_to_document(record, f"{path}:{row}", text_field, id_field)
            except BadRecord as e:
                e.raw = json.dumps(record, default=str, ensure_ascii=False)
                yield e


def read_warc(path: Path) -> Iterator[Document | BadRecord]:
    """Text of WARC `response`/`resource` records (HTML reduced to its visible text) and WET `conversion`
    records; the id is the WARC-Record-ID, `metadata` holds url and date. Non-text records are skipped."""
    try:
        from warcio.archiveiterator import ArchiveIterator
    except ImportError:
        raise LmforgeError(f"{path}: reading WARC files needs the warcio package (pip install warcio)") from None
    from warcio.exceptions import ArchiveLoadFailed

    n = 0
    with open(path, "rb") as f:
        try:
            for record in ArchiveIterator(f):
                if record.rec_type not in ("response", "resource", "conversion"):
                    continue
                n += 1
                source = f"{path}:record {n}"
                if record.rec_type == "conversion":  # WET: already extracted plain text
                    content_type = "text/plain"
                else:
                    content_type = (record.http_headers.get_header("Content-Type") if record.http_headers
                                    else record.rec_headers.get_header("Content-Type")) or "text/plain"
                if not content_type.startswith("text/"):
                    continue
                text = record.content_stream().read().decode("utf-8", "replace")
                rid = record.rec_headers.get_header("WARC-Record-ID") or source
                meta = {"url": record.rec_headers.get_header("WARC-Target-URI"),
                        "date": record.rec_headers.get_header("WARC-Date")}
                if "html" in content_type:
                    html, text = text, html_to_text(text)
                    if not text.strip():
                        yield BadRecord(source, f"no main text extracted from the HTML of {meta['url']}",
                                        raw=html[:1000])
                        continue
                yield Document(id=rid, text=text, source=source, metadata=meta)
        except ArchiveLoadFailed as e:
            raise LmforgeError(f"{path}: not a readable WARC file ({str(e).splitlines()[0]})") from None


def read_wiki_xml(path: Path) -> Iterator[Document | BadRecord]:
    """Articles of a MediaWiki XML dump (`lmforge.data.wiki`): id "wiki:<page id>", text with the markup removed,
    metadata title; a page whose text is empty after that is a BadRecord."""
    with open_binary(path) as f:
        for n, page in enumerate(wiki.iter_pages(f, path), 1):
            source = f"{path}:page {n}"
            text = wiki.wikitext_to_text(page["wikitext"])
            if not text:
                yield BadRecord(source, "page has no text once markup is removed", raw=page["wikitext"][:1000])
                continue
            yield Document(id=f"wiki:{page['id'] or n}", text=text, source=source, metadata={"title": page["title"]})


def html_to_text(html: str) -> str:
    """Main text of an HTML page. With trafilatura installed (FineWeb's extractor, `pip install 'lmforge[data]'`):
    navigation, headers, footers, sidebars and comments are removed. Without it, the stdlib fallback keeps all
    visible text (script/style dropped), and the log says so once per process."""
    extract = _trafilatura_extract()
    if extract is not None:
        return extract(html, favor_precision=True, include_comments=False, include_tables=True,
                       deduplicate=False) or ""
    return visible_text(html)


_TRAFILATURA: list[Any] = []  # [extract function or None], filled on first use


def _trafilatura_extract() -> Any:
    if not _TRAFILATURA:
        try:
            from trafilatura import extract
        except ImportError:
            extract = None
            logging.getLogger(__name__).warning(
                "trafilatura is not installed: HTML is reduced to all of its visible text (boilerplate kept); "
                "pip install 'lmforge[data]' for main-text extraction")
        _TRAFILATURA.append(extract)
    return _TRAFILATURA[0]


def visible_text(html: str) -> str:
    """Every visible text of an HTML page (the fallback extractor): script/style dropped, block elements become
    line breaks."""
    from html.parser import HTMLParser

    blocks = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "title"}

    class _Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.parts: list[str] = []
            self.skip = 0

        def handle_starttag(self, tag: str, attrs: Any) -> None:
            if tag in ("script", "style", "noscript"):
                self.skip += 1
            elif tag in blocks:
                self.parts.append("\n")

        def handle_endtag(self, tag: str) -> None:
            if tag in ("script", "style", "noscript"):
                self.skip = max(0, self.skip - 1)
            elif tag in blocks:
                self.parts.append("\n")

        def handle_data(self, data: str) -> None:
            if not self.skip:
                self.parts.append(data)

    parser = _Text()
    parser.feed(html)
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


@dataclass(frozen=True)
class InputPart:
    """One shard of an input file: bytes [start, end) of an uncompressed JSONL file (it owns the lines that
    START in the range), or row groups [start, end) of a Parquet file. `lines_before` is the number of
    newlines before `start`, so line numbers stay those of the whole file. `parts == 1`: the whole file."""

    path: Path
    index: int = 0
    parts: int = 1
    start: int = 0
    end: int = 0
    lines_before: int = 0

    @property
    def whole(self) -> bool:
        return self.parts == 1


def split_input(path: Path, split_bytes: int) -> list[InputPart]:
    """Cut a file larger than `split_bytes` into parts of about that size, so one big file keeps every worker
    busy: uncompressed JSONL by byte range, Parquet by row group. Compressed files (.gz/.zst cannot be entered
    in the middle), WARC, wiki dumps and text files (one document each) stay whole. Deterministic: the parts
    depend on the file and `split_bytes` only, never on the number of workers."""
    size = path.stat().st_size
    if split_bytes <= 0 or size <= split_bytes:
        return [InputPart(path)]
    if is_jsonl(path) and path.suffix not in COMPRESSED_SUFFIXES:
        n = -(-size // split_bytes)
        bounds = [size * i // n for i in range(n + 1)]
        newlines = _newlines_before(path, bounds[1:-1])
        return [InputPart(path, i, n, bounds[i], bounds[i + 1], ([0] + newlines)[i]) for i in range(n)]
    if is_parquet(path):
        import pyarrow.parquet as pq

        try:
            groups = pq.ParquetFile(path).metadata.num_row_groups
        except Exception:  # a bad footer: left whole, so the reader reports it the usual way
            return [InputPart(path)]
        n = min(groups, -(-size // split_bytes))
        if n <= 1:
            return [InputPart(path)]
        bounds = [groups * i // n for i in range(n + 1)]
        return [InputPart(path, i, n, bounds[i], bounds[i + 1]) for i in range(n)]
    return [InputPart(path)]


def _newlines_before(path: Path, offsets: list[int], block: int = 1 << 24) -> list[int]:
    """Newlines in bytes [0, offset) for each (ascending) offset, in one pass over the file."""
    out: list[int] = []
    count = pos = 0
    with open(path, "rb") as f:
        for offset in offsets:
            while pos < offset:
                data = f.read(min(block, offset - pos))
                if not data:
                    break
                count += data.count(b"\n")
                pos += len(data)
            out.append(count)
    return out


def _range_lines(f: IO[bytes], part: InputPart) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of every line that starts in [part.start, part.end): a line crossing `start` belongs
    to the part before, one crossing `end` to this part, so each line is read exactly once."""
    lineno = part.lines_before + 1
    if part.start > 0:
        f.seek(part.start - 1)
        if f.read(1) != b"\n":  # we are inside a line that started in the previous part: skip it
            f.readline()
            lineno += 1
    pos = f.tell()
    while pos < part.end:
        raw = f.readline()
        if not raw:
            return
        yield lineno, raw
        lineno += 1
        pos += len(raw)


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


def decode_utf8(data: bytes, source: str, invalid_utf8: InvalidUTF8 = "reject",
                where: str = "line") -> tuple[str, int]:
    """(text, number of invalid byte sequences replaced); "reject" raises BadRecord naming the offset."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if invalid_utf8 != "repair":
            raise BadRecord(source, f"not valid UTF-8 (byte offset {e.start} in the {where})") from None
    text = data.decode("utf-8", "replace")
    return text, text.count("\ufffd") - data.count(b"\xef\xbf\xbd")


def parse_jsonl_line(raw: bytes, source: str, text_field: str = "text", id_field: str = "id",
                     invalid_utf8: InvalidUTF8 = "reject") -> Document:
    """Decode and validate one JSONL record; every problem raises `BadRecord(source, problem)`.

    Keys other than text and id go to `metadata` (a nested "metadata" object is merged in).
    """
    line, repaired = decode_utf8(raw, source, invalid_utf8)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(source, f"malformed JSON: {e.msg} at column {e.colno}") from None
    doc = record_to_document(record, source, text_field, id_field)
    if repaired:
        doc.metadata["utf8_repaired"] = repaired
    return doc


def record_to_document(record: Any, source: str, text_field: str = "text", id_field: str = "id") -> Document:
    """Validate one decoded record (a JSON object or a Parquet row); problems raise BadRecord."""
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


def read_text_file(path: Path, invalid_utf8: InvalidUTF8 = "reject") -> Document:
    """The whole file is one document (compressed `.gz`/`.zst` text is decompressed).

    A file with NUL bytes is binary, not text: BadRecord, whatever `invalid_utf8` says.
    """
    with open_binary(path) as f:
        try:
            data = f.read()
        except decompress_errors() as e:
            raise LmforgeError(f"{path}: cannot decompress ({e})") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise BadRecord(str(path), f"binary file (NUL byte at offset {nul}), not text",
                        raw=data[:1000].decode("utf-8", "replace"))
    try:
        text, repaired = data.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if invalid_utf8 != "repair":
            line = data.count(b"\n", 0, e.start) + 1
            raise BadRecord(f"{path}:{line}", f"not valid UTF-8 (byte offset {e.start} in the file)",
                            raw=data.decode("utf-8", "replace")) from None
        text, repaired = decode_utf8(data, str(path), "repair")
    meta = {"utf8_repaired": repaired} if repaired else {}
    return Document(id=str(path), text=text, source=str(path), metadata=meta)
