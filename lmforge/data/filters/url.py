"""URL filter: drop documents by where they come from (RefinedWeb, Penedo et al. 2023, Sec. G.1; FineWeb's URL
filter): a domain with its subdomains, an exact host, an exact URL, a banned word among the URL's words (hard:
one is enough; soft: `soft_threshold` distinct ones), or a banned sub-word anywhere in the URL.

The block list is a user file, one `KIND VALUE` entry per line (`#` comments and blank lines allowed):

    domain example.com        # example.com and every *.example.com
    host   ads.example.org    # that host only
    url    http://example.net/page?id=1
    word   casino             # a whole word of the URL
    soft   free               # soft words: `soft_threshold` of them block the URL
    subword porn              # anywhere in the URL, inside words too

plus a small built-in list of adult words (`builtin = false` turns it off). The URL is the document's
`metadata[url_field]`: WARC records carry their target URI there, JSONL/Parquet records their "url" field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from lmforge.core.config import option, require
from lmforge.core.errors import ConfigError
from lmforge.data.readers import Document
from lmforge.data.steps import Step

KINDS = ("domain", "host", "url", "word", "soft", "subword")
BUILTIN = {
    "word": ["porn", "porno", "xxx", "hentai", "xvideos", "xhamster", "pornhub", "redtube", "camgirls"],
    "soft": ["sex", "sexy", "nude", "naked", "escort", "escorts", "adult", "erotic", "milf", "fetish", "nsfw",
             "webcam", "girls", "cams"],
    "subword": ["pornhub", "xvideos", "porno"],
}
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")


def normalize_url(url: str) -> tuple[str, str]:
    """(host, host+path+query) lowercased host, no scheme, fragment, default port, "www." or trailing slash."""
    parts = urlsplit(url.strip() if "//" in url else "//" + url.strip())
    host = (parts.hostname or "").rstrip(".")
    host = host.removeprefix("www.")
    path = parts.path.rstrip("/")
    return host, host + path + (f"?{parts.query}" if parts.query else "")


def read_blocklist(path: str | Path) -> dict[str, set[str]]:
    """Entries by kind; a line that is not `KIND VALUE` is a ConfigError naming file:line."""
    lists: dict[str, set[str]] = {k: set() for k in KINDS}
    path = Path(path)
    require(path.is_file(), "url.file", str(path), "an existing file")
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = re.split(r"\s#", line, maxsplit=1)[0].strip()  # "#" after a space starts a comment (not in a URL)
        if not line or line.startswith("#"):
            continue
        kind, _, value = line.partition(" ")
        value = value.strip().lower()
        if kind not in KINDS or not value or (kind != "url" and " " in value):
            raise ConfigError(f"{path}:{lineno}: expected 'KIND VALUE' with KIND one of {', '.join(KINDS)}, "
                              f"got '{line[:80]}'")
        if kind in ("domain", "host"):
            if "/" in value or not re.fullmatch(r"[a-z0-9.-]+", value.removeprefix("www.")):
                raise ConfigError(f"{path}:{lineno}: '{value}' is not a host name (a URL goes on a 'url' line)")
            value = value.removeprefix("www.")
        lists[kind].add(normalize_url(value)[1] if kind == "url" else value)
    return lists


@dataclass
class URLFilter(Step):
    """Reject documents whose URL is block-listed; documents without a URL pass (counted as no_url)."""

    name = "url"
    file: list[str] = option(default_factory=list, help="block-list files, one 'KIND VALUE' per line "
                                                        "(kinds: domain, host, url, word, soft, subword)")
    builtin: bool = option(True, help="also apply the small built-in list of adult words")
    soft_threshold: int = option(2, help="distinct soft words in one URL that block it")
    url_field: str = option("url", help="metadata field holding the URL")
    _lists: dict[str, set[str]] = field(default_factory=dict, init=False, repr=False)
    _no_url: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        require(self.soft_threshold >= 1, "url.soft_threshold", self.soft_threshold, ">= 1")
        lists: dict[str, set[str]] = {k: set() for k in KINDS}
        if self.builtin:
            for kind, values in BUILTIN.items():
                lists[kind].update(values)
        for path in self.file:
            for kind, values in read_blocklist(path).items():
                lists[kind].update(values)
        require(any(lists.values()), "url.file", self.file, "given, or url.builtin true: the block list is empty")
        self._lists = lists

    def __call__(self, doc: Document) -> str | None:
        url = doc.metadata.get(self.url_field)
        if not isinstance(url, str) or not url.strip():
            self._no_url += 1
            return None
        return self.check(url)

    def check(self, url: str) -> str | None:
        """The reason `url` is blocked, or None."""
        lists = self._lists
        host, key = normalize_url(url)
        if host in lists["host"]:
            return f"url_host:{host}"
        labels = host.split(".")
        for i in range(len(labels)):
            if ".".join(labels[i:]) in lists["domain"]:
                return f"url_domain:{'.'.join(labels[i:])}"
        if key in lists["url"]:
            return "url_listed"
        words = set(_WORD_SPLIT.split(url.lower()))
        hard = sorted(words & lists["word"])
        if hard:
            return f"url_word:{hard[0]}"
        soft = sorted(words & lists["soft"])
        if len(soft) >= self.soft_threshold:
            return f"url_soft_words:{'+'.join(soft)}"
        low = url.lower()
        for sub in sorted(lists["subword"]):
            if sub in low:
                return f"url_subword:{sub}"
        return None

    def pop_counters(self) -> dict[str, int]:
        n, self._no_url = self._no_url, 0
        return {"no_url": n} if n else {}
