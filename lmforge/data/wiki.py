"""Wikipedia (MediaWiki) XML dumps: pages streamed with `iterparse`, wikitext reduced to plain text.

Safe against entity expansion ("billion laughs") and external entities: with defusedxml installed its
`iterparse` refuses entity declarations; without it a document type declaration (where entities are
declared) is refused before parsing starts. Real dumps have neither.

Wikitext to text (what WikiExtractor and the pile's wiki pipeline do, written here): comments, <ref>s,
templates `{{...}}` and tables `{|...|}` (nested) removed; `[[target|label]]` -> label, `[[target]]` ->
target, `[[File:...]]`/`[[Category:...]]` removed; `[url label]` -> label; bold/italic quotes and heading
marks dropped; remaining tags stripped; entities decoded.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lmforge.core.errors import LmforgeError

DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref\b[^>/]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_DROP_TAGS = re.compile(r"<(gallery|math|score|timeline|syntaxhighlight|source)\b[^>]*>.*?</\1\s*>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EXT_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_LIST = re.compile(r"^[*#:;]+\s*", re.M)


def wikitext_to_text(text: str) -> str:
    """Plain text of one page's wikitext (see the module docstring)."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_TAGS.sub("", text)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_nested(text, "{|", "|}")
    text = _links(text)
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(lambda m: m.group(2), text)
    text = _LIST.sub("", text)
    text = html.unescape(text)
    lines = (" ".join(line.split()) for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _remove_nested(text: str, open_: str, close: str) -> str:
    """Drop every (possibly nested) `open_ ... close` span; an unclosed one runs to the end of the text."""
    out: list[str] = []
    depth = i = 0
    start = 0
    while i < len(text):
        if text.startswith(open_, i):
            if depth == 0:
                out.append(text[start:i])
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
            start = i
        else:
            i += 1
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


def _links(text: str) -> str:
    """[[target|label]] -> label, [[target]] -> target; file/category links (which may nest links) removed."""
    out: list[str] = []
    i = 0
    while True:
        j = text.find("[[", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        depth, k = 0, j
        while k < len(text):
            if text.startswith("[[", k):
                depth += 1
                k += 2
            elif text.startswith("]]", k):
                depth -= 1
                k += 2
                if depth == 0:
                    break
            else:
                k += 1
        inner = text[j + 2:k - 2] if depth == 0 else text[j + 2:]
        if not inner.lower().lstrip(":").startswith(DROP_LINK_PREFIXES):
            target, _, label = inner.partition("|")
            out.append(_links(label) if label else target.split("#")[0] or target)
        i = k


def iter_pages(f: IO[bytes], path: Path, namespaces: tuple[str, ...] = ("0",)) -> Iterator[dict[str, Any]]:
    """{"id", "title", "wikitext"} of each article (main namespace, not a redirect) in a dump stream."""
    f = _refuse_dtd(f, path)
    try:
        import defusedxml.ElementTree as safe_et

        events = safe_et.iterparse(f, events=("end",), forbid_dtd=True)
    except ImportError:
        import xml.etree.ElementTree as ET

        events = ET.iterparse(f, events=("end",))
    pages, elem = 0, None
    try:
        for _, elem in events:
            if _local(elem.tag) != "page":
                continue
            pages += 1
            fields = {_local(c.tag): c for c in elem}
            ns = fields["ns"].text if "ns" in fields else "0"
            revision = fields.get("revision")
            text_el = None if revision is None else next((c for c in revision if _local(c.tag) == "text"), None)
            if ns in namespaces and "redirect" not in fields and text_el is not None and text_el.text:
                yield {"id": fields["id"].text if "id" in fields else None,
                       "title": fields["title"].text if "title" in fields else "", "wikitext": text_el.text}
            elem.clear()
        if not pages and elem is not None and _local(elem.tag) != "mediawiki":
            raise LmforgeError(f"{path}: not a MediaWiki XML dump (root element <{_local(elem.tag)}>, no <page>s)")
    except Exception as e:  # ParseError, defusedxml's DTDForbidden/EntitiesForbidden
        if isinstance(e, LmforgeError):
            raise
        raise LmforgeError(f"{path}: not a readable MediaWiki XML dump ({type(e).__name__}: {e})") from None


def _refuse_dtd(f: IO[bytes], path: Path, head_bytes: int = 1 << 16) -> IO[bytes]:
    """Entities can only be declared in a DTD, which must come before the root element: refuse a DTD there, or a
    prolog too long to look through. Returns the stream to parse (buffered, nothing consumed)."""
    f = io.BufferedReader(f, buffer_size=head_bytes)  # type: ignore[arg-type]
    head = f.peek(head_bytes)[:head_bytes]
    root = re.search(rb"<[A-Za-z]", head)
    if root is None and len(head) >= head_bytes:
        raise LmforgeError(f"{path}: no root element in the first {head_bytes // 1024} KiB; not a MediaWiki dump")
    if b"<!DOCTYPE" in (head[: root.start()] if root else head).upper():
        raise LmforgeError(f"{path}: the XML declares a DTD (<!DOCTYPE>), which can expand entities; refused "
                           "(MediaWiki dumps have none)")
    return f


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
