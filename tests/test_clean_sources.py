"""Source-specific readers and filters: Wikipedia XML dumps, Project Gutenberg books, source code."""

import bz2

import pytest

from lmforge.core.errors import LmforgeError
from lmforge.data.pipeline import clean_documents
from lmforge.data.readers import iter_records, read_documents
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
