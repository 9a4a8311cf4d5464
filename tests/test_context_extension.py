"""Context extension end to end on a tiny byte-level model: pretrain at 32 tokens, continue at 128 with
YaRN RoPE scaling (recipes/extend-context.toml with small overrides), and `lmforge eval context`
reporting perplexity at 1x, 2x, 4x before and after."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from textdata import SHAKESPEARE

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.data.shards import ShardWriter
from lmforge.eval.context import load_for_length, original_length, parse_lengths, parse_multiples
from lmforge.model import load_model

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "extend-context.toml"
TINY = ["--model.preset", "debug", "--model.d-model", "32", "--train.device", "cpu", "--train.precision", "fp32",
        "--train.log-every", "1000", "--train.eval-every", "0", "--train.save-every", "0"]


def byte_shards(root: Path) -> Path:
    text = SHAKESPEARE.read_bytes()[:120_000]
    for split, part in (("train", text[:100_000]), ("val", text[100_000:])):
        with ShardWriter(root / split, 256) as w:
            w.add(np.frombuffer(part, dtype=np.uint8).astype(np.int64), n_bytes=len(part))
    return root


@pytest.mark.slow
def test_extend_context_recipe_and_eval(tmp_path, capsys):
    shards = byte_shards(tmp_path / "shards")
    base, extended = tmp_path / "base", tmp_path / "extended"
    assert main(["pretrain", "--run-dir", str(base), "--data.path", str(shards), "--data.seq-len", "32",
                 "--data.batch-size", "16", "--model.max-seq-len", "32", "--train.steps", "60", "--train.lr", "3e-3",
                 "--train.warmup-steps", "5", *TINY]) == 0
    assert main(["pretrain", str(RECIPE), "--run-dir", str(extended), "--init-from", str(base / "model"),
                 "--data.path", str(shards), "--data.seq-len", "128", "--model.max-seq-len", "128",
                 "--model.rope-original-max-seq-len", "32", "--train.steps", "30", "--train.lr", "1e-3",
                 "--train.warmup-steps", "3", *TINY]) == 0
    cfg = load_model(extended / "model").cfg
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.max_seq_len, original_length(cfg)) == ("yarn", 4.0, 128, 32)
    capsys.readouterr()
    out_json = tmp_path / "context.json"
    assert main(["eval", "context", "--checkpoint", str(extended / "model"), "--baseline", str(base / "model"),
                 "--data", str(shards), "--lengths", "1,2,4", "--device", "cpu", "--output", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "original context: 32 tokens" in printed
    assert all(f"| {m}x | {n} |" in printed for m, n in ((1, 32), (2, 64), (4, 128)))
    result = json.loads(out_json.read_text())
    after, before = result["perplexity"]["checkpoint"], result["perplexity"]["baseline"]
    assert sorted(after, key=int) == sorted(before, key=int) == ["32", "64", "128"]
    assert all(math.isfinite(v) and 1 < v < 256 for v in [*after.values(), *before.values()])
    # the unscaled base model extrapolates badly to 4x; the extended one was trained there
    assert after["128"] < before["128"]


def test_lengths_and_learned_positions(tmp_path):
    assert parse_lengths(parse_multiples("1,2,4"), 32) == [32, 64, 128]
    assert parse_lengths(parse_multiples("0.5, 1.5"), 32) == [16, 48]
    with pytest.raises(LmforgeError, match="positive"):
        parse_multiples("0,1")
    with pytest.raises(LmforgeError, match="comma-separated"):
        parse_multiples("1,x")
    from lmforge.core.config import from_dict
    from lmforge.model import ModelConfig, Transformer, save_model

    cfg = from_dict(ModelConfig, {"preset": "debug", "vocab_size": 16, "max_seq_len": 16})
    rope = save_model(Transformer(cfg), tmp_path / "rope")
    assert load_for_length(rope, 64).cfg.max_seq_len == 64
    learned = save_model(Transformer(from_dict(ModelConfig, {"preset": "debug", "vocab_size": 16, "max_seq_len": 16,
                                                              "position": "learned"})), tmp_path / "learned")
    with pytest.raises(LmforgeError, match="learned absolute positions"):
        load_for_length(learned, 64)
