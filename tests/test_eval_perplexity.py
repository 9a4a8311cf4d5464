import json
import math

import numpy as np
import pytest
import torch
from tinymodels import debug_model

from lmforge.cli import main
from lmforge.data.shards import ShardSet, ShardWriter
from lmforge.model import Transformer, save_model
from lmforge.train.evaluate import evaluate_perplexity
from lmforge.train.objectives import causal_lm_loss

VOCAB = 64
SEQ = 16


def tiny_model(vocab: int = VOCAB, uniform: bool = False, **overrides) -> Transformer:
    model = debug_model(vocab, 0, max_seq_len=32, **overrides).train()
    if uniform:
        with torch.no_grad():
            model.lm_head.weight.zero_()  # every logit 0 -> p = 1/V everywhere
    return model


def make_shards(directory, n_tokens: int, vocab: int = VOCAB, bytes_per_token: int = 2,
                seed: int = 0) -> ShardSet:
    rng = np.random.default_rng(seed)
    with ShardWriter(directory, vocab, max_shard_tokens=100) as w:
        for chunk in np.array_split(rng.integers(0, vocab, n_tokens), max(1, n_tokens // 20)):
            w.add(chunk, n_bytes=bytes_per_token * len(chunk))
    return ShardSet(directory)


def test_uniform_model_has_perplexity_vocab_size(tmp_path):
    ss = make_shards(tmp_path, 10 * SEQ + 1)
    result = evaluate_perplexity(tiny_model(uniform=True), ss, SEQ, batch_size=4, max_batches=0)
    assert result["loss"] == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert result["perplexity"] == pytest.approx(VOCAB, rel=1e-5)
    # ln(64) / ln(2) = 6 bits per token, 2 bytes per token -> 3 bits per byte.
    assert result["bits_per_byte"] == pytest.approx(3.0, rel=1e-6)
    assert result["tokens"] == 10 * SEQ  # every window once, last batch cut short instead of wrapping


def test_bits_per_byte_hand_computed(tmp_path):
    with ShardWriter(tmp_path, 256) as w:
        w.add(np.arange(33), n_bytes=132)  # 4 bytes per token
    result = evaluate_perplexity(tiny_model(vocab=256, uniform=True), ShardSet(tmp_path), SEQ, batch_size=2)
    assert result["tokens"] == 32
    assert result["bits_per_byte"] == pytest.approx(8 / 4, rel=1e-6)  # log2(256) bits / 4 bytes


def test_loss_matches_direct_computation(tmp_path):
    ss = make_shards(tmp_path, 7 * SEQ + 5)
    model = tiny_model()
    result = evaluate_perplexity(model, ss, SEQ, batch_size=3, max_batches=2)
    windows = torch.from_numpy(np.stack([ss.read(i * SEQ, SEQ + 1) for i in range(6)]))
    with torch.no_grad():
        expected = causal_lm_loss(model(windows[:, :-1]), windows[:, 1:]).item()
    assert result["tokens"] == 6 * SEQ
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_restores_mode_and_runs_in_eval_mode(tmp_path):
    ss = make_shards(tmp_path, 4 * SEQ + 1)
    model = tiny_model(dropout=0.5).train()
    first = evaluate_perplexity(model, ss, SEQ, batch_size=2)
    assert model.training
    assert evaluate_perplexity(model, ss, SEQ, batch_size=2)["loss"] == first["loss"]  # no dropout noise
    model.eval()
    evaluate_perplexity(model, ss, SEQ, batch_size=2)
    assert not model.training


def test_bf16_close_to_fp32_and_nan_bpb_without_bytes(tmp_path):
    ss = make_shards(tmp_path, 4 * SEQ + 1, bytes_per_token=0)
    model = tiny_model()
    fp32 = evaluate_perplexity(model, ss, SEQ, batch_size=2, precision="fp32")
    bf16 = evaluate_perplexity(model, ss, SEQ, batch_size=2, precision="bf16")
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2)
    assert math.isnan(fp32["bits_per_byte"])


def test_eval_cli_prints_json(tmp_path, capsys):
    save_model(tiny_model(uniform=True), tmp_path / "model")
    make_shards(tmp_path / "data/train", 6 * SEQ + 1, seed=1)
    make_shards(tmp_path / "data/val", 4 * SEQ + 1, seed=2)
    rc = main(["eval", "--checkpoint", str(tmp_path / "model"), "--data", str(tmp_path / "data"),
               "--seq_len", str(SEQ), "--batch_size", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    record = json.loads(out.strip().splitlines()[-1])
    assert record["data"] == str(tmp_path / "data/val")  # val/ preferred over train/
    assert record["tokens"] == 4 * SEQ and record["seq_len"] == SEQ
    assert record["perplexity"] == pytest.approx(VOCAB, rel=1e-5)
    assert record["bits_per_byte"] == pytest.approx(3.0, rel=1e-5)
    assert "perplexity" in out.splitlines()[4]


def test_eval_cli_falls_back_to_train_and_default_seq_len(tmp_path, capsys):
    save_model(tiny_model(), tmp_path / "model")
    make_shards(tmp_path / "data/train", 4 * 32 + 1)
    assert main(["eval", "--checkpoint", str(tmp_path / "model"), "--data", str(tmp_path / "data")]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["data"] == str(tmp_path / "data/train") and record["seq_len"] == 32
    assert "no val/ split" in captured.err


@pytest.mark.parametrize("args, message", [
    (["--data", "{big}"], "vocab_size 100, larger than the checkpoint's 64"),
    (["--data", "{missing}"], "does not exist"),
    (["--data", "{empty}"], "no token shards"),
    (["--data", "{ok}", "--seq_len", "33"], "exceeds the checkpoint's max_seq_len 32"),
    (["--data", "{ok}", "--batch_size", "0"], "batch_size must be positive"),
])
def test_eval_cli_errors(tmp_path, capsys, args, message):
    save_model(tiny_model(), tmp_path / "model")
    make_shards(tmp_path / "big", 100, vocab=100)
    make_shards(tmp_path / "ok", 100)
    (tmp_path / "empty").mkdir()
    paths = {k: str(tmp_path / k) for k in ("big", "ok", "empty", "missing")}
    rc = main(["eval", "--checkpoint", str(tmp_path / "model")] + [a.format(**paths) for a in args])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1
