"""Source-specific readers and filters: Wikipedia XML dumps, Project Gutenberg books, source code."""

import bz2
import io
import logging
import sys
import sysconfig
from pathlib import Path

import pytest
from textdata import read_jsonl, write_jsonl

from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.data import readers
from lmforge.data.filters.code import CodeFilter
from lmforge.data.filters.gutenberg import GutenbergFilter
from lmforge.data.pipeline import clean_documents, make_step
from lmforge.data.readers import BadRecord, Document, iter_records, read_documents
from lmforge.data.wiki import wikitext_to_text

ARTICLE = """{{Infobox city
| name = Testville
| population = {{formatnum:12345}}
}}
'''Testville''' is a [[town]] in [[Examplia|the Republic of Examplia]].<ref name="a">{{cite web|url=http://x.org}}</ref>
It was founded in 1820.<ref>Smith 2001, p. 4.</ref>

== History ==
The town grew around a [[railway station#Old|station]] built by [http://rail.example.org the Rail Company].
[[File:Testville.jpg|thumb|A view of [[Testville]] at night]]
<!-- editors: keep this short -->
{| class="wikitable"
|-
! Year !! Population
|-
| 1900 || {{n|500}}
|}
* The church &amp; the mill are listed buildings.
[[Category:Towns in Examplia]]
"""


def dump(pages: list[tuple[str, str, str, str]], head: str = "") -> str:
    body = "".join(
        f"<page><title>{title}</title><ns>{ns}</ns><id>{pid}</id>"
        + ("<redirect title='X' />" if text.startswith("#REDIRECT") else "")
        + f"<revision><id>1</id><text xml:space='preserve'>{escape(text)}</text></revision></page>"
        for title, ns, pid, text in pages)
    return (head + '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" xml:lang="en">'
            f"<siteinfo><sitename>Wikipedia</sitename></siteinfo>{body}</mediawiki>")


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_wikitext_to_text_removes_templates_links_refs_tables():
    text = wikitext_to_text(ARTICLE)
    assert text.startswith("Testville is a town in the Republic of Examplia.\nIt was founded in 1820.")
    assert "History\nThe town grew around a station built by the Rail Company." in text
    assert "The church & the mill are listed buildings." in text
    for gone in ("{{", "}}", "Infobox", "12345", "Smith 2001", "cite", "[[", "]]", "wikitable", "1900", "editors",
                 "Category", "Testville.jpg", "night", "'''", "http", "<ref", "=="):
        assert gone not in text, gone


def test_wikipedia_dump_articles_only_bz2_and_cleaned(tmp_path):
    xml = dump([("Testville", "0", "7", ARTICLE), ("Talk:Testville", "1", "8", "chatter"),
                ("Old name", "0", "9", "#REDIRECT [[Testville]]"), ("Empty", "0", "10", "{{Disambig}}")])
    path = tmp_path / "enwiki-pages-articles.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    records = list(iter_records(path))
    assert [type(r).__name__ for r in records] == ["Document", "BadRecord"]  # talk page and redirect skipped
    assert records[0].id == "wiki:7" and records[0].metadata == {"title": "Testville"}
    assert records[0].text == wikitext_to_text(ARTICLE)
    assert records[1].problem == "page has no text once markup is removed"
    stats = clean_documents([path], tmp_path / "out", steps=["exact_dedup"], workers=1, progress=False)
    assert stats["docs_kept"] == 1 and stats["records_rejected_at_read"] == 1


def test_wikipedia_dump_with_entities_is_refused(tmp_path):
    laughs = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>\n')
    path = tmp_path / "evil.xml"
    path.write_text(dump([("T", "0", "1", "&lol2;")], head=laughs).replace("&amp;lol2;", "&lol2;"))
    with pytest.raises(LmforgeError, match=r"evil.xml: .*(DTD|DOCTYPE)"):
        list(read_documents([path]))
    other = tmp_path / "feed.xml"
    other.write_text("<rss><channel><title>News</title></channel></rss>")
    with pytest.raises(LmforgeError, match=r"feed.xml: not a MediaWiki XML dump \(root element <rss>"):
        list(read_documents([other]))
    bad = tmp_path / "bad.xml"
    bad.write_text("<mediawiki><page><title>x</page>")
    with pytest.raises(LmforgeError, match="bad.xml: not a readable MediaWiki XML dump"):
        list(read_documents([bad]))


def news_page(i: int) -> str:
    """A page as sites serve them: a menu, a cookie banner, the article, related links, a footer."""
    paragraphs = "".join(
        f"<p>Paragraph {k} of story {i}: the river council met on Tuesday and agreed, after a long debate about "
        f"the flooding of the lower fields, to rebuild the old stone weir before the autumn rains arrive.</p>"
        for k in range(5))
    return f"""<!DOCTYPE html><html><head><title>Story {i} | Daily Example</title>
<script>var tracking = "secret-tracker";</script><style>.nav {{color: red}}</style></head><body>
<header><nav class="menu"><ul><li><a href="/">Home</a></li><li><a href="/world">World news</a></li>
<li><a href="/sport">Sport section</a></li><li><a href="/login">Sign in to your account</a></li></ul></nav></header>
<div class="cookie-banner">We use cookies to improve your experience. Accept all cookies</div>
<main><article><h1>The weir will be rebuilt</h1>{paragraphs}</article></main>
<aside class="related"><h3>Related</h3><ul><li><a href="/a">Ten recipes for summer salads</a></li>
<li><a href="/b">Celebrity spotted at the airport</a></li></ul></aside>
<footer><p>Copyright 2026 Daily Example Media Group. All rights reserved.</p>
<p><a href="/privacy">Privacy policy</a> | <a href="/terms">Terms of use</a></p></footer></body></html>"""


BOILERPLATE = ["World news", "Sport section", "Sign in", "Accept all cookies", "summer salads", "Celebrity",
               "All rights reserved", "Privacy policy", "secret-tracker"]


def test_html_main_text_kept_boilerplate_removed(tmp_path):
    pytest.importorskip("trafilatura")
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = tmp_path / "crawl.warc.gz"
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for i, body in enumerate([news_page(0), news_page(1), "<html><body><script>var x = 1;</script></body></html>"]):
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(f"http://news.example.org/{i}", "response",
                                                          payload=io.BytesIO(body.encode()), http_headers=headers))
    records = list(iter_records(path))
    docs = [r for r in records if not isinstance(r, BadRecord)]
    assert len(docs) == 2 and docs[1].metadata["url"] == "http://news.example.org/1"
    for k in range(5):
        assert f"Paragraph {k} of story 1: the river council met on Tuesday" in docs[1].text
    for junk in BOILERPLATE:
        assert junk not in docs[1].text, junk
    assert isinstance(records[2], BadRecord) and "no main text extracted" in records[2].problem


def test_html_fallback_without_trafilatura_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(readers, "_TRAFILATURA", [])
    monkeypatch.setitem(sys.modules, "trafilatura", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING, logger="lmforge.data.readers"):
        texts = [readers.html_to_text(news_page(i)) for i in range(3)]
    assert sum("trafilatura is not installed" in r.message for r in caplog.records) == 1
    assert "Paragraph 4 of story 2" in texts[2] and "secret-tracker" not in texts[2]
    assert "World news" in texts[2]  # the fallback keeps the boilerplate: that is why it is only a fallback


GUTENBERG = """\ufeffThe Project Gutenberg eBook of The Test Voyage, by A. Writer

This eBook is for the use of anyone anywhere in the United States and most other parts of the world at no
cost and with almost no restrictions whatsoever. You may copy it, give it away or re-use it under the terms
of the Project Gutenberg License included with this eBook or online at www.gutenberg.org.

Title: The Test Voyage
Release Date: January 1, 2001 [eBook #99999]
Language: English

*** START OF THE PROJECT GUTENBERG EBOOK THE TEST VOYAGE ***




Produced by Volunteer Proofreaders at the Distributed Proofreading Team.



CHAPTER I.

The ship left the harbour at dawn, and the sailors sang as they hauled the ropes.

CHAPTER II.

By noon the wind had turned, and the captain called all hands on deck.

End of the Project Gutenberg EBook of The Test Voyage, by A. Writer

*** END OF THE PROJECT GUTENBERG EBOOK THE TEST VOYAGE ***

Updated editions will replace the previous one--the old editions will be renamed.

START: FULL LICENSE

THE FULL PROJECT GUTENBERG LICENSE
PLEASE READ THIS BEFORE YOU DISTRIBUTE OR USE THIS WORK
Section 1. General Terms of Use and Redistributing Project Gutenberg-tm electronic works
"""


def test_gutenberg_book_keeps_only_the_text_between_the_markers(tmp_path):
    old_style = GUTENBERG.replace("*** START OF THE PROJECT GUTENBERG EBOOK", "*** START OF THIS PROJECT GUTENBERG "
                                  "EBOOK").replace("*** END OF THE", "***END OF THIS")
    write_jsonl(tmp_path / "in" / "books.jsonl", [{"id": "new", "text": GUTENBERG}, {"id": "old", "text": old_style},
                                                  {"id": "plain", "text": "Not from Gutenberg at all.\n"}])
    stats = clean_documents([tmp_path / "in"], tmp_path / "out", steps=["gutenberg"], workers=1, progress=False)
    kept = {r["id"]: r["text"] for r in read_jsonl(tmp_path / "out" / "kept" / "00000-books.jsonl")}
    book = ("CHAPTER I.\n\nThe ship left the harbour at dawn, and the sailors sang as they hauled the ropes.\n\n"
            "CHAPTER II.\n\nBy noon the wind had turned, and the captain called all hands on deck.\n")
    assert kept == {"new": book, "old": book, "plain": "Not from Gutenberg at all.\n"}
    assert stats["steps"][1]["counters"]["no_markers"] == 1
    with pytest.raises(ConfigError, match="missing: .drop. is not one of keep, reject"):
        make_step({"name": "gutenberg", "missing": "drop"})
    assert GutenbergFilter(missing="reject")(Document("p", "plain text", "s")) == "no_gutenberg_markers"


def stdlib_file(name: str) -> Document:
    path = Path(sysconfig.get_paths()["stdlib"]) / name
    return Document(name, path.read_text(encoding="utf-8"), str(path))


def test_code_rules_on_pythons_own_stdlib():
    flt = CodeFilter()
    for generated in ("token.py", "keyword.py", "stringprep.py", "encodings/cp1252.py"):
        assert flt(stdlib_file(generated)) == "auto_generated", generated
    tar = stdlib_file("tarfile.py")
    original = tar.text
    assert flt(tar) is None
    assert tar.text.startswith('#!/usr/bin/env python3\n"""Read from and write to tar format archives.')
    assert "Permission  is  hereby granted" not in tar.text and tar.text.endswith(original[-2000:])
    for plain in ("os.py", "json/decoder.py", "_collections_abc.py"):
        doc = stdlib_file(plain)
        assert flt(doc) is None, plain
    assert flt.pop_counters() == {"license_headers_stripped": 2}  # tarfile.py and _collections_abc.py
    assert flt(stdlib_file("pydoc_data/topics.py")) == "auto_generated"  # "# Autogenerated by Sphinx", line 2
    os_py = stdlib_file("os.py")
    assert CodeFilter(max_line_length=70)(os_py) == "max_line_length"
    minified = Document("m", "function f(a){return a+1};" * 50 + "\n", "m")
    assert flt(minified) == "max_line_length"
    assert CodeFilter(max_mean_line_length=20)(os_py) == "mean_line_length"
    table = Document("t", "\n".join(f"    0x{i:02x}, 0x{i:02x}, -1, -1, ..." for i in range(300)), "t")
    assert flt(table) is None and CodeFilter(min_alnum_fraction=0.6)(table) == "alnum_fraction"


def test_without_defusedxml_a_dtd_is_still_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "defusedxml", None)
    monkeypatch.setitem(sys.modules, "defusedxml.ElementTree", None)
    ok = tmp_path / "ok.xml"
    ok.write_text(dump([("Testville", "0", "7", ARTICLE)]))
    assert [d.id for d in read_documents([ok])] == ["wiki:7"]
    evil = tmp_path / "evil.xml"
    evil.write_text('<?xml version="1.0"?>\n<!-- a comment -->\n<!DOCTYPE m [<!ENTITY a "aaaa">]>\n'
                    + dump([("T", "0", "1", "x")]))
    with pytest.raises(LmforgeError, match=r"evil.xml: the XML declares a DTD"):
        list(read_documents([evil]))
