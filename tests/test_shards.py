import json
from pathlib import Path

import numpy as np
import pytest
from textdata import SHAKESPEARE

from lmforge.core.errors import LmforgeError
from lmforge.data import shards as shards_mod
from lmforge.data.shards import INDEX_NAME, ShardSet, ShardWriter


def random_docs(n: int, vocab: int, seed: int = 0, max_len: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(0, max_len)) for _ in range(n)]


def write(directory: Path, docs, vocab: int = 1000, max_shard_tokens: int = 100, **kw) -> dict:
    with ShardWriter(directory, vocab, max_shard_tokens=max_shard_tokens, **kw) as w:
        for doc in docs:
            w.add(doc, n_bytes=2 * len(doc))
    return json.loads((directory / INDEX_NAME).read_text())


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_round_trip_across_shards(tmp_path):
    docs = random_docs(60, 1000)
    index = write(tmp_path, docs, max_shard_tokens=100)
    stream = np.concatenate(docs)
    assert len(index["shards"]) == -(-len(stream) // 100) >= 2
    assert [s["n_tokens"] for s in index["shards"][:-1]] == [100] * (len(index["shards"]) - 1)
    assert index["dtype"] == "uint16" and index["n_tokens"] == len(stream) and index["n_docs"] == 60
    assert index["n_bytes"] == 2 * len(stream)

    ss = ShardSet(tmp_path)
    assert (ss.n_tokens, ss.n_docs, ss.n_bytes, ss.vocab_size) == (len(stream), 60, 2 * len(stream), 1000)
    assert ss.dtype == np.uint16 and ss.bytes_per_token == 2.0
    np.testing.assert_array_equal(ss.read(0, ss.n_tokens), stream)
    for start, length in [(95, 10), (99, 1), (100, 1), (0, 250), (ss.n_tokens - 3, 3), (150, 0)]:
        out = ss.read(start, length)
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, stream[start:start + length])
    ends = ss.doc_ends()
    assert ends.dtype == np.uint64
    np.testing.assert_array_equal(ends, np.cumsum([len(d) for d in docs]))
    with pytest.raises(IndexError):
        ss.read(ss.n_tokens - 1, 2)


def test_document_exactly_filling_a_shard(tmp_path):
    write(tmp_path, [np.arange(10), np.arange(10), np.arange(5)], max_shard_tokens=10)
    ss = ShardSet(tmp_path)
    assert [s["n_docs"] for s in ss.index["shards"]] == [1, 1, 1]
    np.testing.assert_array_equal(ss.doc_ends(), [10, 20, 25])


def test_big_vocab_uses_uint32(tmp_path):
    docs = [np.array([0, 65535, 65536, 69999])]
    assert write(tmp_path / "a", docs, vocab=70000)["dtype"] == "uint32"
    ss = ShardSet(tmp_path / "a")
    assert ss.dtype == np.uint32
    np.testing.assert_array_equal(ss.read(0, 4), docs[0])
    assert (tmp_path / "a/shard_00000.bin").stat().st_size == 16
    assert write(tmp_path / "b", [np.array([65535])], vocab=65536)["dtype"] == "uint16"


def test_buffered_writes_flush_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "_FLUSH_TOKENS", 7)
    docs = random_docs(50, 300, seed=3)
    write(tmp_path, docs, vocab=300, max_shard_tokens=64)
    np.testing.assert_array_equal(ShardSet(tmp_path).read(0, sum(map(len, docs))), np.concatenate(docs))


def test_writer_copies_the_callers_buffer(tmp_path):
    buf = np.array([1, 2, 3], dtype=np.uint16)
    with ShardWriter(tmp_path, 10) as w:
        w.add(buf)
        buf[:] = 9
        w.add(buf)
    np.testing.assert_array_equal(ShardSet(tmp_path).read(0, 6), [1, 2, 3, 9, 9, 9])


def test_empty_writer_writes_valid_index(tmp_path):
    index = ShardWriter(tmp_path, 50, eos_id=3).close()
    assert index["n_tokens"] == 0 and index["eos_id"] == 3
    ss = ShardSet(tmp_path)
    assert ss.n_tokens == 0 and ss.n_docs == 0 and ss.bytes_per_token == 0.0 and ss.eos_id == 3
    assert ss.doc_ends().size == 0 and ss.read(0, 0).size == 0


@pytest.mark.parametrize("bad", [[1, -1], [1, 10], [[1, 2]], [1.5, 2.0]])
def test_add_rejects_bad_ids(tmp_path, bad):
    w = ShardWriter(tmp_path, 10)
    with pytest.raises(ValueError):
        w.add(bad)


def test_exception_in_context_leaves_no_index(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, 10) as w:
        w.add([1, 2])
        raise RuntimeError("boom")
    with pytest.raises(LmforgeError, match="no shard index"):
        ShardSet(tmp_path)


def test_rewriting_a_directory_drops_old_shards(tmp_path):
    write(tmp_path, random_docs(40, 100), vocab=100, max_shard_tokens=50)
    assert len(list(tmp_path.glob("shard_*.bin"))) > 1
    write(tmp_path, [np.array([4, 5])], vocab=100, max_shard_tokens=50)
    assert sorted(p.name for p in tmp_path.iterdir()) == [INDEX_NAME, "shard_00000.bin", "shard_00000.idx"]
    assert ShardSet(tmp_path).n_tokens == 2


def test_missing_directory_or_index(tmp_path):
    with pytest.raises(LmforgeError) as e:
        ShardSet(tmp_path / "nope")
    assert str(tmp_path / "nope") in one_line_error(e)


@pytest.mark.parametrize("mutate, message", [
    (lambda ix: "{not json", "invalid JSON at line 1"),
    (lambda ix: {**ix, "format": "other/9"}, "format"),
    (lambda ix: {**ix, "dtype": "int8"}, "'dtype'"),
    (lambda ix: {**ix, "n_tokens": ix["n_tokens"] + 1}, "'n_tokens'"),
    (lambda ix: {**ix, "vocab_size": "big"}, "'vocab_size'"),
    (lambda ix: {**ix, "shards": [{**ix["shards"][0], "tokens": "../x.bin"}] + ix["shards"][1:]},
     "shards[0].tokens"),
    (lambda ix: {k: v for k, v in ix.items() if k != "shards"}, "'shards'"),
])
def test_corrupted_index(tmp_path, mutate, message):
    index = write(tmp_path, random_docs(30, 1000), max_shard_tokens=100)
    new = mutate(index)
    (tmp_path / INDEX_NAME).write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(LmforgeError) as e:
        ShardSet(tmp_path)
    msg = one_line_error(e)
    assert message in msg and INDEX_NAME in msg


def test_truncated_or_missing_shard_file(tmp_path):
    write(tmp_path, random_docs(30, 1000), max_shard_tokens=100)
    bin1 = tmp_path / "shard_00001.bin"
    bin1.write_bytes(bin1.read_bytes()[:-2])
    with pytest.raises(LmforgeError) as e:
        ShardSet(tmp_path)
    assert "shard_00001.bin" in one_line_error(e) and "truncated" in str(e.value)
    bin1.unlink()
    with pytest.raises(LmforgeError, match="shard_00001.bin: shard file missing"):
        ShardSet(tmp_path)


def test_corrupted_doc_ends(tmp_path):
    write(tmp_path, [np.arange(5), np.arange(5)], max_shard_tokens=100)
    np.array([7, 3], dtype="<u8").tofile(tmp_path / "shard_00000.idx")
    with pytest.raises(LmforgeError, match="shard_00000.idx"):
        ShardSet(tmp_path).doc_ends()


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="tinyshakespeare not available")
def test_byte_level_shakespeare(tmp_path):
    """Byte ids (vocab 256 + eos) make the bytes-per-token ratio exactly computable."""
    paragraphs = SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")[:400]
    eos = 256
    with ShardWriter(tmp_path, 257, eos_id=eos, max_shard_tokens=4096) as w:
        for p in paragraphs:
            data = p.encode("utf-8")
            w.add(list(data) + [eos], n_bytes=len(data))
    ss = ShardSet(tmp_path)
    n_bytes = sum(len(p.encode()) for p in paragraphs)
    assert ss.n_tokens == n_bytes + len(paragraphs) and ss.n_bytes == n_bytes
    assert ss.bytes_per_token == pytest.approx(n_bytes / (n_bytes + len(paragraphs)))
    ends = ss.doc_ends().astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    k = 123
    doc = ss.read(int(starts[k]), int(ends[k] - starts[k]))
    assert doc[-1] == eos and bytes(doc[:-1].astype(np.uint8)).decode() == paragraphs[k]


def test_writer_refuses_a_file_as_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(LmforgeError, match="not a directory"):
        ShardWriter(tmp_path / "f", 10)
