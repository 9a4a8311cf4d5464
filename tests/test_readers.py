import gzip
import importlib.util
import io
import json

import pytest

from lmforge.core.errors import LmforgeError
from lmforge.data.readers import Document, read_documents


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def error_of(paths, **kwargs) -> str:
    with pytest.raises(LmforgeError) as e:
        list(read_documents(paths, **kwargs))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_jsonl_documents_sources_ids_and_metadata(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 7, "text": "héllo", "lang": "fr", "metadata": {"url": "u"}}\n'
                    "\n"
                    '   \n'
                    '{"text": "second"}\n', encoding="utf-8")
    docs = list(read_documents([path]))
    assert docs[0] == Document(id="7", text="héllo", source=f"{path}:1", metadata={"url": "u", "lang": "fr"})
    assert docs[1].text == "second"
    assert docs[1].source == f"{path}:4"  # blank lines are skipped but still counted
    assert docs[1].id == f"{path}:4"


def test_gzip_json_and_text_files(tmp_path):
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "zipped 😀"}\n{"text": "two"}\n')
    write_jsonl(tmp_path / "c.json", [{"body": "lines in .json", "key": "k1"}])
    (tmp_path / "d.txt").write_text("a whole\nfile\n", encoding="utf-8")
    with gzip.open(tmp_path / "e.txt.gz", "wb") as f:
        f.write(b"compressed text")

    assert [d.text for d in read_documents([tmp_path / "b.jsonl.gz"])] == ["zipped 😀", "two"]
    doc = next(read_documents([tmp_path / "c.json"], text_field="body", id_field="key"))
    assert (doc.id, doc.text, doc.metadata) == ("k1", "lines in .json", {})
    text_doc = next(read_documents([str(tmp_path / "d.txt")]))
    assert (text_doc.text, text_doc.source) == ("a whole\nfile\n", str(tmp_path / "d.txt"))
    assert next(read_documents([tmp_path / "e.txt.gz"])).text == "compressed text"


def test_directories_are_walked_recursively_in_sorted_order(tmp_path):
    (tmp_path / "z").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "z" / "1.txt").write_text("z1")
    (tmp_path / "a" / "deep" / "2.txt").write_text("a-deep-2")
    (tmp_path / "a" / "1.txt").write_text("a1")
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\xff\xfe")
    assert [d.text for d in read_documents([tmp_path])] == ["a1", "a-deep-2", "b", "z1"]


def test_reading_is_lazy_and_streams(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    docs = read_documents([path])
    assert next(docs).text == "ok"  # the bad second line has not been read yet
    with pytest.raises(LmforgeError, match=r"s\.jsonl:2: malformed JSON"):
        next(docs)


@pytest.mark.parametrize("line, problem", [
    ('{"text": "a",}', "malformed JSON"),
    ('["text"]', "expected a JSON object, got list"),
    ('{"content": "no text key"}', "missing text field 'text'"),
    ('{"text": 3}', "field 'text' must be a string, got int"),
    ('{"text": "\\ud800 lone surrogate"}', "unpaired surrogate"),
])
def test_bad_records_name_file_line_and_problem(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    message = error_of([path])
    assert message.startswith(f"{path}:3: ")
    assert problem in message


def test_invalid_utf8_in_jsonl_and_text_file(tmp_path):
    jsonl = tmp_path / "latin1.jsonl"
    with open(jsonl, "wb") as f:
        f.write(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    message = error_of([jsonl])
    assert message.startswith(f"{jsonl}:2: not valid UTF-8")
    assert "byte offset 13" in message

    text = tmp_path / "latin1.txt"
    with open(text, "wb") as f:
        f.write(b"line one\nline two caf\xe9\n")
    message = error_of([text])
    assert message.startswith(f"{text}:2: not valid UTF-8")
    assert "byte offset 21" in message


def test_missing_path_and_corrupt_gzip(tmp_path):
    assert error_of([tmp_path / "nope.jsonl"]) == f"{tmp_path / 'nope.jsonl'}: no such file or directory"
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"this is not gzip data")
    assert error_of([bad]).startswith(f"{bad}:1: cannot decompress")


@pytest.mark.skipif(importlib.util.find_spec("zstandard") is not None, reason="zstandard is installed")
def test_zst_without_zstandard_says_how_to_install(tmp_path):
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    assert "pip install zstandard" in error_of([path])


@pytest.mark.skipif(importlib.util.find_spec("zstandard") is None, reason="zstandard is not installed")
def test_zst_jsonl(tmp_path):
    import zstandard

    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zst one"}\n{"text": "zst two"}\n'))
    assert [d.text for d in read_documents([path])] == ["zst one", "zst two"]


def test_parquet_rows_with_configurable_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.data.readers import BadRecord, iter_records

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["one", None, "three"], "key": ["k1", "k2", "k3"], "lang": ["en"] * 3}), path)
    items = list(iter_records(path, text_field="body", id_field="key"))
    assert [(d.id, d.text, d.metadata) for d in (items[0], items[2])] == [("k1", "one", {"lang": "en"}),
                                                                          ("k3", "three", {"lang": "en"})]
    assert isinstance(items[1], BadRecord) and items[1].source == f"{path}:2" and "must be a string" in items[1].problem
    assert "no column 'text'" in error_of([path])


def test_warc_response_and_wet_conversion_records(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = tmp_path / "crawl.warc.gz"
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        html = b"<html><head><style>x{}</style><script>var a;</script></head><body><p>Hello page.</p><p>Two</p></body>"
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record("http://example.org/", "response", payload=io.BytesIO(html),
                                                      http_headers=headers))
        writer.write_record(writer.create_warc_record("http://example.org/img", "response",
                                                      payload=io.BytesIO(b"\x89PNG"), http_headers=StatusAndHeaders(
                                                          "200 OK", [("Content-Type", "image/png")],
                                                          protocol="HTTP/1.1")))
        writer.write_record(writer.create_warc_record("http://example.org/t", "conversion",
                                                      payload=io.BytesIO(b"plain extracted text")))
    docs = list(read_documents([path]))
    assert [d.text for d in docs] == ["Hello page.\nTwo", "plain extracted text"]
    assert docs[0].metadata["url"] == "http://example.org/" and docs[0].id.startswith("<urn:uuid:")


def test_invalid_utf8_repair_and_binary_files(tmp_path):
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"text": "caf\xe9 and cr\xe8me"}\n')
    doc = next(read_documents([jsonl], invalid_utf8="repair"))
    assert doc.text == "caf\ufffd and cr\ufffdme" and doc.metadata["utf8_repaired"] == 2
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"GIF89a\x00\x01")
    assert "binary file (NUL byte at offset 6)" in error_of([binary], invalid_utf8="repair")
