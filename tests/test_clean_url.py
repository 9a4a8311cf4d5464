"""The URL filter (RefinedWeb/FineWeb style): domains with subdomains, hosts, URLs, hard/soft/sub-words."""

import io

import pytest
from textdata import read_jsonl, write_jsonl

from lmforge.core.errors import ConfigError
from lmforge.data.filters.url import URLFilter
from lmforge.data.pipeline import clean_documents, make_step
from lmforge.data.readers import Document

BLOCKLIST = """# our list
domain spam.example              # and every subdomain
host   ads.news.example
url    https://www.blog.example/posts/2/?ref=1
word   casino
soft   free
soft   download
subword warez
"""


def blocked(flt: URLFilter, url: str) -> str | None:
    return flt(Document("d", "text", "src", {"url": url}))


@pytest.fixture
def flt(tmp_path):
    path = tmp_path / "block.txt"
    path.write_text(BLOCKLIST)
    return URLFilter(file=[str(path)], builtin=False)


@pytest.mark.parametrize("url, reason", [
    ("http://spam.example/page", "url_domain:spam.example"),
    ("https://www.deep.sub.spam.example:8080/x", "url_domain:spam.example"),
    ("http://ads.news.example/banner", "url_host:ads.news.example"),
    ("http://blog.example/posts/2?ref=1#top", "url_listed"),
    ("http://games.example/best-casino-bonus", "url_word:casino"),
    ("http://files.example/free-download-now", "url_soft_words:download+free"),
    ("http://files.example/mywarezsite/x", "url_subword:warez"),
])
def test_each_kind_blocks(flt, url, reason):
    assert blocked(flt, url) == reason


@pytest.mark.parametrize("url", [
    "http://notspam.example/",             # a different domain that ends with the same letters
    "http://news.example/ads",              # the parent of a blocked host
    "http://blog.example/posts/3",          # another page of the blocked URL's site
    "http://shop.example/casinos-history",  # a word that only contains a hard word
    "http://files.example/free-software",   # one soft word is not enough
])
def test_near_misses_pass(flt, url):
    assert blocked(flt, url) is None


def test_builtin_list_and_documents_without_url():
    flt = URLFilter()
    assert blocked(flt, "https://www.example-porn.com/video") == "url_word:porn"
    assert blocked(flt, "https://cams.example/sexy-nude") == "url_soft_words:cams+nude+sexy"
    assert blocked(flt, "https://en.wikipedia.org/wiki/Essex") is None
    assert flt(Document("d", "text", "src", {})) is None and flt.pop_counters() == {"no_url": 1}


def test_a_bad_line_names_file_and_line(tmp_path):
    bad = tmp_path / "block.txt"
    bad.write_text("domain ok.example\n\ndomian typo.example\n")
    with pytest.raises(ConfigError, match=r"block.txt:3: expected 'KIND VALUE'"):
        URLFilter(file=[str(bad)])
    bad.write_text("domain http://site.example/path\n")
    with pytest.raises(ConfigError, match=r"block.txt:1: 'http://site.example/path' is not a host name"):
        make_step({"name": "url", "file": [str(bad)]})


def test_pipeline_counts_removed_docs_with_reason_jsonl_and_warc(tmp_path):
    from warcio.warcwriter import WARCWriter

    (tmp_path / "block.txt").write_text(BLOCKLIST)
    write_jsonl(tmp_path / "in" / "a.jsonl", [
        {"id": "ok", "text": "fine text", "url": "http://good.example/"},
        {"id": "spam", "text": "spam text", "url": "http://x.spam.example/"},
        {"id": "nourl", "text": "no url here"},
    ])
    with open(tmp_path / "in" / "b.warc", "wb") as f:
        writer = WARCWriter(f, gzip=False)
        for url in ("http://ads.news.example/1", "http://news.example/story"):
            writer.write_record(writer.create_warc_record(url, "resource", payload=io.BytesIO(b"Some page text."),
                                                          warc_headers_dict={"Content-Type": "text/plain"}))
    stats = clean_documents([tmp_path / "in"], tmp_path / "out", workers=1, progress=False,
                            steps=[{"name": "url", "file": [str(tmp_path / "block.txt")]}])
    step = stats["steps"][1]
    assert step["reasons"] == {"url_domain:spam.example": 1, "url_host:ads.news.example": 1}
    assert step["counters"] == {"no_url": 1} and stats["docs_kept"] == 3
    rejects = read_jsonl(tmp_path / "out" / "rejects" / "url.jsonl")
    assert [(r["id"], r["reason"]) for r in rejects][0] == ("spam", "url_domain:spam.example")
