import json

import pytest

from lmforge.core.errors import LmforgeError
from lmforge.data.corpus import build_stdlib_corpus, interleave, stdlib_code_documents
from lmforge.data.readers import read_documents


def test_small_corpus_mixes_code_and_docs_within_the_budget(tmp_path):
    stats = build_stdlib_corpus(tmp_path / "corpus.jsonl", max_bytes=300_000)
    lines = (tmp_path / "corpus.jsonl").read_bytes().rstrip(b"\n").split(b"\n")  # not str.splitlines
    records = [json.loads(line) for line in lines]
    assert stats["docs"] == len(records) > 2
    assert stats["bytes"] == sum(len(r["text"].encode()) for r in records) <= 300_000
    assert set(stats["by_source"]) == {"stdlib-code", "pydoc-topics"}
    for source, counts in stats["by_source"].items():
        mine = [r for r in records if r["metadata"]["source"] == source]
        assert counts == {"docs": len(mine), "bytes": sum(len(r["text"].encode()) for r in mine)}
    assert len({r["id"] for r in records}) == len(records)
    code = [r for r in records if r["metadata"]["source"] == "stdlib-code"]
    assert all(r["metadata"]["path"].endswith(".py") for r in code)
    assert any("def " in r["text"] for r in code)
    docs = list(read_documents([tmp_path / "corpus.jsonl"]))  # the corpus is valid reader input
    assert [d.text for d in docs] == [r["text"] for r in records]

    again = build_stdlib_corpus(tmp_path / "again.jsonl", max_bytes=300_000)
    assert again["docs"] == stats["docs"]
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "corpus.jsonl").read_bytes()


def test_code_documents_skip_tests_vendored_big_and_non_utf8_files(tmp_path):
    root = tmp_path / "lib"
    for rel, data in {
        "b.py": b"x = 1\n",
        "pkg/a.py": b"def f(): pass\n",
        "pkg/test/test_a.py": b"assert True\n",
        "tests/t.py": b"",
        "site-packages/numpy/core.py": b"",
        "idlelib/x.py": b"",
        "latin1.py": b"s = 'caf\xe9'\n",
        "huge.py": b"#" * 200_001,
        "notes.txt": b"not python",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    docs = list(stdlib_code_documents(root))
    assert [d["metadata"]["path"] for d in docs] == ["b.py", "pkg/a.py"]
    assert docs[1] == {"id": "stdlib/pkg/a.py", "text": "def f(): pass\n",
                       "metadata": {"source": "stdlib-code", "path": "pkg/a.py"}}


def test_interleave_round_robin():
    assert list(interleave([1, 2, 3], "ab", [])) == [1, "a", 2, "b", 3]


def test_bad_budgets(tmp_path):
    with pytest.raises(LmforgeError, match="max_bytes must be positive"):
        build_stdlib_corpus(tmp_path / "c.jsonl", max_bytes=0)
    with pytest.raises(LmforgeError, match="no stdlib document fits"):
        build_stdlib_corpus(tmp_path / "c.jsonl", max_bytes=5)
    assert list(tmp_path.iterdir()) == []  # no empty or temporary file is left behind
