"""`lmforge data tokenize` with worker processes and document shuffling: same bytes for any worker count."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from textdata import SHAKESPEARE

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.data.shards import ShardSet, ShardWriter, shard_layout
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.pack import is_val_doc, tokenize_to_shards
from lmforge.tokenizer.train import train_bpe

TEXTS = [t for t in SHAKESPEARE.read_text(encoding="utf-8")[:80_000].split("\n\n") if t][:240]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(TEXTS, vocab_size=400, show_progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two JSONL files and a text file (one document), read in sorted order."""
    root = tmp_path_factory.mktemp("corpus")
    half = len(TEXTS) // 2
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:half]))
    (root / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [*TEXTS[half:], ""]))
    (root / "c.txt").write_text("naïve café 😀 日本語", encoding="utf-8")
    return root


def all_docs() -> list[str]:
    return [*TEXTS, "naïve café 😀 日本語"]


def file_hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def split_docs(shards: ShardSet) -> list[tuple[int, ...]]:
    tokens = shards.read(0, shards.n_tokens).tolist()
    ends = [0, *shards.doc_ends().tolist()]
    return [tuple(tokens[a:b]) for a, b in zip(ends, ends[1:])]


def test_output_is_identical_for_any_worker_count(tok, corpus, tmp_path):
    runs = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        tokenize_to_shards([corpus], tok, out, val_fraction=0.1, seed=7, batch_docs=16, max_shard_tokens=3000,
                           workers=workers, shuffle=True)
        runs[workers] = file_hashes(out)
    assert len([k for k in runs[1] if k.startswith("train/shard_")]) > 4  # many shards, docs span them
    assert runs[1] == runs[2] == runs[3]
    assert not any(".tokenize-spill" in name for name in runs[1])  # the spill file is gone


def test_shuffle_permutes_documents_deterministically(tok, corpus, tmp_path):
    encoded = [tuple(tok.encode(t, add_eos=True)) for t in all_docs()]
    val_idx = {i for i in range(len(encoded)) if is_val_doc(i, 3, 0.1)}
    orders = {}
    for name, seed, shuffle in [("plain", 3, False), ("a", 3, True), ("b", 3, True), ("c", 4, True)]:
        tokenize_to_shards([corpus], tok, tmp_path / name, val_fraction=0.1, seed=seed, max_shard_tokens=5000,
                           shuffle=shuffle)
        orders[name] = split_docs(ShardSet(tmp_path / name / "train"))
        val = split_docs(ShardSet(tmp_path / name / "val"))
        if seed == 3:
            assert sorted(val) == sorted(encoded[i] for i in val_idx)
    train = [e for i, e in enumerate(encoded) if i not in val_idx]
    assert orders["plain"] == train
    assert orders["a"] == orders["b"] != train  # seeded: reproducible, and really shuffled
    assert sorted(orders["a"]) == sorted(train)  # a permutation: nothing lost, nothing repeated
    first_shard_docs = ShardSet(tmp_path / "a" / "train").index["shards"][0]["n_docs"]
    assert set(orders["a"][:first_shard_docs]) != set(train[:first_shard_docs])  # mixed across shards
    assert orders["c"] != orders["a"]


@pytest.mark.parametrize("max_shard_tokens", [1, 7, 64, "first_doc", 10**9])
def test_shards_match_the_streaming_writer(tok, corpus, tmp_path, max_shard_tokens):
    """Shards written in parallel from the layout equal ShardWriter's, byte for byte, including documents
    that end exactly on a shard boundary."""
    docs = all_docs()[:40 if max_shard_tokens != 1 else 6]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    encoded = [tok.encode(t, add_eos=True) for t in docs]
    if max_shard_tokens == "first_doc":
        max_shard_tokens = len(encoded[0])
    tokenize_to_shards([small], tok, tmp_path / "par", val_fraction=0.0, max_shard_tokens=max_shard_tokens,
                       workers=2)
    with ShardWriter(tmp_path / "ref", tok.vocab_size, tok.sha256, tok.eos_id, max_shard_tokens) as ref:
        for text, ids in zip(docs, encoded):
            ref.add(ids, n_bytes=len(text.encode()))
    assert file_hashes(tmp_path / "par" / "train") == file_hashes(tmp_path / "ref")


def test_shard_layout_edges():
    assert shard_layout(np.array([], np.int64), 10) == [(0, 0, 0)]
    # docs of 5, 5, 3 tokens in 5-token shards: [d0] [d1] [d2]; then 4-token shards: d0 spans two
    assert shard_layout(np.array([5, 5, 3]), 5) == [(0, 1, 1), (1, 2, 2), (2, 3, 3)]
    assert shard_layout(np.array([5, 5, 3]), 4) == [(0, 1, 0), (0, 2, 1), (1, 3, 2), (2, 3, 3)]


def test_bad_arguments_and_inputs(tok, corpus, tmp_path, capsys, monkeypatch):
    with pytest.raises(LmforgeError, match="workers must be >= 1"):
        tokenize_to_shards([corpus], tok, tmp_path / "o", workers=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(LmforgeError, match="no non-empty documents"):
        tokenize_to_shards([empty], tok, tmp_path / "o", workers=2)
    assert not (tmp_path / "o" / "train" / "index.json").exists()
    assert not list((tmp_path / "o").glob(".tokenize-spill*"))

    tok.save(tmp_path / "tok")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    assert main(["data", "tokenize", "--input", str(bad), "--tokenizer", str(tmp_path / "tok"),
                 "--output", str(tmp_path / "bad_out"), "--workers", "2"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("lmforge: error:")] == \
        [f"lmforge: error: {bad}:2: field 'text' must be a string, got int"]

    import lmforge.data.readers as readers

    def unreadable(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(readers, "read_jsonl", unreadable)
    assert main(["data", "tokenize", "--input", str(bad), "--tokenizer", str(tmp_path / "tok"),
                 "--output", str(tmp_path / "bad_out"), "--workers", "2"]) != 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("lmforge: error:")] == \
        [f"lmforge: error: {bad}: Permission denied"]


def test_cli_workers_shuffle_and_megatron(tok, corpus, tmp_path, capsys):
    tok.save(tmp_path / "tok")
    args = ["data", "tokenize", "--input", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--shuffle",
            "--val_fraction", "0.05", "--max_shard_tokens", "4000"]
    assert main([*args, "--output", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert main([*args, "--output", str(tmp_path / "two"), "--workers", "2",
                 "--megatron", str(tmp_path / "mg" / "data")]) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "megatron:" in printed
    assert file_hashes(tmp_path / "one") == file_hashes(tmp_path / "two")
    for split in ("train", "val"):
        shards = ShardSet(tmp_path / "two" / split)
        data = np.fromfile(tmp_path / "mg" / f"data_{split}.bin", dtype="<u2")
        assert np.array_equal(data, shards.read(0, shards.n_tokens))
        assert (tmp_path / "mg" / f"data_{split}.idx").is_file()


def _dying_encode(texts):
    """Like _encode_batch, but the worker that gets TEXTS[100] is killed, as the OOM killer would."""
    import os
    import signal

    from lmforge.tokenizer import pack as tokenize

    if TEXTS[100] in texts:
        os.kill(os.getpid(), signal.SIGKILL)
    return tokenize.__dict__["_original_encode"](texts)


@pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(), reason="needs fork")
def test_a_dead_worker_is_a_one_line_error(tok, corpus, tmp_path, monkeypatch):
    from lmforge.tokenizer import pack as tokenize

    monkeypatch.setattr(tokenize, "_original_encode", tokenize._encode_batch, raising=False)
    monkeypatch.setattr(tokenize, "_encode_batch", _dying_encode)
    with pytest.raises(LmforgeError, match="worker process died"):
        tokenize_to_shards([corpus], tok, tmp_path / "o", workers=2, batch_docs=8)
    assert not (tmp_path / "o" / "train" / "index.json").exists()
