"""Source-specific readers and filters: Wikipedia XML dumps, Project Gutenberg books, source code."""

import bz2
import io
import logging
import sys

import pytest

from lmforge.core.errors import LmforgeError
from lmforge.data import readers
from lmforge.data.pipeline import clean_documents
from lmforge.data.readers import BadRecord, iter_records, read_documents
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
