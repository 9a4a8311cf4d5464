import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from textdata import SHAKESPEARE

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.data.shards import ShardSet
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.pack import is_val_doc, tokenize_to_shards
from lmforge.tokenizer.train import byte_level_bpe, train_bpe


def documents() -> list[str]:
    """Speeches of tinyshakespeare (or generated text), plus some multi-byte characters."""
    if SHAKESPEARE.is_file():
        speeches = SHAKESPEARE.read_text(encoding="utf-8")[:60_000].split("\n\n")
    else:
        speeches = [f"Speech {i}: now is the winter of our discontent, number {i * 7}." for i in range(150)]
    return [*speeches[:149], "naïve café 😀 日本語"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(documents(), vocab_size=400, show_progress=False)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    docs = documents()
    lines = [json.dumps({"text": t}) for t in docs]
    lines.insert(3, json.dumps({"text": ""}))  # empty documents are skipped, not written as a lone eos
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def split_docs(shards: ShardSet) -> list[list[int]]:
    tokens = shards.read(0, shards.n_tokens).tolist()
    ends = [0, *shards.doc_ends().tolist()]
    return [tokens[a:b] for a, b in zip(ends, ends[1:])]


def expected_split(n_docs: int, seed: int, val_fraction: float) -> set[int]:
    """The documented rule: hash of (seed, index); if that leaves val empty, the last document."""
    val = {i for i in range(n_docs) if is_val_doc(i, seed, val_fraction)}
    return val or {n_docs - 1}


def test_shards_hold_exactly_the_encoded_documents(tok, corpus, tmp_path):
    out = tmp_path / "shards"
    result = tokenize_to_shards([corpus], tok, out, val_fraction=0.1, seed=3, batch_docs=16,
                                max_shard_tokens=2000)
    texts = documents()
    encoded = [tok.encode(t, add_eos=True) for t in texts]
    val_idx = expected_split(len(texts), 3, 0.1)
    assert 0 < len(val_idx) < len(texts)

    train, val = ShardSet(out / "train"), ShardSet(out / "val")
    assert len(train.index["shards"]) > 1  # documents span several shard files
    assert split_docs(train) == [e for i, e in enumerate(encoded) if i not in val_idx]
    assert split_docs(val) == [e for i, e in enumerate(encoded) if i in val_idx]
    assert train.n_docs + val.n_docs == len(texts)
    assert train.n_bytes == sum(len(t.encode()) for i, t in enumerate(texts) if i not in val_idx)
    assert train.eos_id == tok.eos_id and train.vocab_size == tok.vocab_size
    assert result["train"]["n_tokens"] == train.n_tokens and result["val"]["n_docs"] == val.n_docs
    assert result["seconds"] > 0

    copied = Tokenizer.load(out)  # the shard directory carries its tokenizer
    assert copied.sha256 == tok.sha256 == train.tokenizer_sha256 == val.tokenizer_sha256
    assert hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest() == train.tokenizer_sha256


def test_split_is_deterministic_and_seeded(tok, corpus, tmp_path):
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        tokenize_to_shards([corpus], tok, tmp_path / name, val_fraction=0.2, seed=seed)
        runs[name] = split_docs(ShardSet(tmp_path / name / "val"))
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_val_gets_a_document_even_when_the_fraction_rounds_to_none(tok, tmp_path):
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one", "two", "three"]))
    tokenize_to_shards([path], tok, tmp_path / "s", val_fraction=1e-9)
    assert split_docs(ShardSet(tmp_path / "s" / "val")) == [tok.encode("three", add_eos=True)]
    assert ShardSet(tmp_path / "s" / "train").n_docs == 2

    result = tokenize_to_shards([path], tok, tmp_path / "noval", val_fraction=0.0)
    assert result["val"] is None and not (tmp_path / "noval" / "val").exists()
    assert ShardSet(tmp_path / "noval" / "train").n_docs == 3
    tokenize_to_shards([path], tok, tmp_path / "s", val_fraction=0.0)  # rerun into a dir that has val/
    assert ShardSet(tmp_path / "s" / "train").n_docs == 3
    with pytest.raises(LmforgeError, match="no shard index"):
        ShardSet(tmp_path / "s" / "val")  # the old val set is gone, not silently stale


def test_bad_inputs_raise_one_line_errors(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n\n')
    with pytest.raises(LmforgeError, match="no non-empty documents"):
        tokenize_to_shards([empty], tok, tmp_path / "o")
    with pytest.raises(LmforgeError, match="no such file"):
        tokenize_to_shards([tmp_path / "missing.jsonl"], tok, tmp_path / "o")
    with pytest.raises(LmforgeError, match="val_fraction"):
        tokenize_to_shards([empty], tok, tmp_path / "o", val_fraction=1.0)
    with pytest.raises(LmforgeError, match="no eos token"):
        tokenize_to_shards([empty], Tokenizer(byte_level_bpe()), tmp_path / "o")


def test_cli_data_tokenize(tok, corpus, tmp_path, capsys):
    tok.save(tmp_path / "tok")
    out = tmp_path / "shards"
    assert main(["data", "tokenize", "--input", str(corpus), "--tokenizer", str(tmp_path / "tok"),
                 "--output", str(out), "--val_fraction", "0.05"]) == 0
    assert "train:" in capsys.readouterr().out
    train = ShardSet(out / "train")
    assert train.n_docs + ShardSet(out / "val").n_docs == len(documents())
    first = train.read(0, int(train.doc_ends()[0]))
    assert np.array_equal(first, tok.encode(documents()[0], add_eos=True))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "wrong field"}\n')
    code = main(["data", "tokenize", "--input", str(bad), "--tokenizer", str(tmp_path / "tok"),
                 "--output", str(tmp_path / "bad_out")])
    assert code != 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lmforge: error:")]  # besides the tqdm bar
    assert errors == [f"lmforge: error: {bad}:2: missing text field 'text'"]
    assert "Traceback" not in err
    assert not (tmp_path / "bad_out" / "train" / "index.json").exists()  # an aborted run leaves no index

    assert main(["data", "tokenize", "--input", str(corpus), "--tokenizer", str(tmp_path / "nowhere")]) != 0
    assert "nowhere" in capsys.readouterr().err
