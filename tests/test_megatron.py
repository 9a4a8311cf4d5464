"""Megatron-LM .bin/.idx export, checked with a reader written here from the format spec, not lmforge's writer."""

import struct
from pathlib import Path

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.data.megatron import export_megatron
from lmforge.data.shards import ShardSet, ShardWriter

# Megatron-LM's DType enum (megatron/core/datasets/indexed_dataset.py)
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                   8: np.uint16}


def read_megatron(prefix: Path) -> list[np.ndarray]:
    """Documents of an MMapIndexedDataset: header, then sizes (int32), pointers (int64), doc_idx (int64)."""
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack_from("<Q", raw, 9)
    code, = struct.unpack_from("<B", raw, 17)
    n_seq, n_doc_idx = struct.unpack_from("<QQ", raw, 18)
    assert version == 1
    offset = 34
    sizes = np.frombuffer(raw, dtype="<i4", count=n_seq, offset=offset)
    offset += 4 * n_seq
    pointers = np.frombuffer(raw, dtype="<i8", count=n_seq, offset=offset)
    offset += 8 * n_seq
    doc_idx = np.frombuffer(raw, dtype="<i8", count=n_doc_idx, offset=offset)
    assert offset + 8 * n_doc_idx == len(raw)  # nothing after the document index
    dtype = np.dtype(MEGATRON_DTYPES[code]).newbyteorder("<")
    data = np.memmap(f"{prefix}.bin", dtype=np.uint8, mode="r")
    assert pointers[-1] + sizes[-1] * dtype.itemsize == len(data) if n_seq else len(data) == 0
    sequences = [np.frombuffer(data, dtype=dtype, count=int(n), offset=int(p)) for n, p in zip(sizes, pointers)]
    assert doc_idx[0] == 0 and doc_idx[-1] == n_seq and np.all(np.diff(doc_idx) >= 0)
    return [np.concatenate([np.empty(0, dtype), *sequences[a:b]]) for a, b in zip(doc_idx, doc_idx[1:])]


def make_shards(directory: Path, vocab_size: int, n_docs: int, max_shard_tokens: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab_size, rng.integers(1, 200)) for _ in range(n_docs)]
    with ShardWriter(directory, vocab_size, eos_id=0, max_shard_tokens=max_shard_tokens) as w:
        for doc in docs:
            w.add(doc)
    return docs


@pytest.mark.parametrize("vocab_size, code", [(50_000, 8), (70_000, 4)])
def test_export_reads_back_with_independent_reader(tmp_path, vocab_size, code):
    docs = make_shards(tmp_path / "shards", vocab_size, 300, max_shard_tokens=4096)
    shards = ShardSet(tmp_path / "shards")
    assert len(shards.index["shards"]) > 3  # documents cross shard files
    bin_path, idx_path = export_megatron(shards, tmp_path / "out" / "data")
    assert (bin_path.name, idx_path.name) == ("data.bin", "data.idx")
    assert Path(idx_path).read_bytes()[17] == code
    read = read_megatron(tmp_path / "out" / "data")
    assert len(read) == len(docs)
    for ours, theirs in zip(docs, read):
        assert np.array_equal(ours, theirs.astype(np.int64))


def test_cli_export_and_errors(tmp_path, capsys):
    docs = make_shards(tmp_path / "shards", 1000, 20, max_shard_tokens=500)
    assert main(["data", "export-megatron", "--shards", str(tmp_path / "shards"),
                 "--output", str(tmp_path / "m" / "corpus_text_document")]) == 0
    assert "20 documents" in capsys.readouterr().out
    read = read_megatron(tmp_path / "m" / "corpus_text_document")
    assert all(np.array_equal(a, b) for a, b in zip(docs, read))
    assert main(["data", "export-megatron", "--shards", str(tmp_path / "nowhere")]) != 0
    err = capsys.readouterr().err
    assert "no shard index" in err and "Traceback" not in err


def test_too_large_vocab_is_refused(tmp_path):
    from lmforge.data.megatron import megatron_dtype

    with pytest.raises(LmforgeError, match="int32"):
        megatron_dtype(1 << 32)
