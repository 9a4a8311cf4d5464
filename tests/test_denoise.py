"""Denoising objectives on hand-checked examples (T5 span corruption, UL2 mode tokens, batching), and
`lmforge pretrain` end to end with objective = prefix_lm / span_corruption / ul2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.data.shards import ShardWriter
from lmforge.model.io import load_model
from lmforge.train.denoise import (
    UL2_DENOISERS,
    DenoiseConfig,
    Denoiser,
    DenoisingBatches,
    SpecialIds,
    collate,
    fit_length,
    make_example,
    n_noise_spans,
    random_segmentation,
    random_spans_noise_mask,
    span_corrupt,
)
from lmforge.train.pretrain import PretrainConfig, pretrain

VOCAB = 50


def test_span_corruption_by_hand():
    tokens = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    mask = np.array([0, 0, 1, 1, 0, 1, 0, 0], dtype=bool)
    inputs, targets = span_corrupt(tokens, mask, [100, 101, 102])
    assert inputs.tolist() == [1, 2, 100, 5, 101, 7, 8]
    assert targets.tolist() == [100, 3, 4, 101, 6]
    with pytest.raises(ConfigError, match="n_sentinels"):
        span_corrupt(tokens, mask, [100])


def test_noise_mask_counts_match_t5():
    assert n_noise_spans(100, 0.15, 3.0) == (15, 5)
    assert n_noise_spans(20, 0.15, 3.0) == (3, 1)
    assert n_noise_spans(4, 0.01, 3.0) == (1, 1)  # at least one noise token
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = random_spans_noise_mask(100, 0.15, 3.0, rng)
        starts = mask & ~np.concatenate([[False], mask[:-1]])
        assert mask.sum() == 15 and starts.sum() == 5 and not mask[0] and mask[-1]
    seg = random_segmentation(10, 4, rng)
    assert seg.sum() == 10 and len(seg) == 4 and (seg >= 1).all()


def test_ul2_examples_carry_their_mode_token():
    ids = SpecialIds(VOCAB, 10)
    assert ids.sentinels[0] == 50 and ids.modes == {"R": 60, "S": 61, "X": 62} and ids.vocab_size == 63
    tokens = np.arange(1, 41)
    rng = np.random.default_rng(0)
    src, tgt = make_example(tokens, Denoiser("S", 0.25), ids, rng, mode_token=True)
    assert src[0] == 61 and np.concatenate([src[1:], tgt]).tolist() == tokens.tolist()
    src, tgt = make_example(tokens, Denoiser("X", 0.5, 3), ids, rng, mode_token=True)
    assert src[0] == 62 and tgt[0] == 50 and (len(src) - 1) + len(tgt) == 40 + 2 * n_noise_spans(40, 0.5, 3)[1]
    for d in UL2_DENOISERS:  # the decoder-only sequence fits its budget
        L = fit_length(d, 33, True)
        src, tgt = make_example(np.arange(1, L + 1), d, ids, rng, mode_token=True)
        assert len(src) + len(tgt) <= 33


def test_encdec_collate_by_hand():
    batch = collate([(np.array([5, 6, 7]), np.array([8, 9])), (np.array([1]), np.array([2, 3, 4]))],
                    encdec=True, start_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [1, 0, 0]]
    assert batch["src_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["targets"].tolist() == [[8, 9, IGNORE_INDEX], [2, 3, 4]]
    assert batch["decoder_input_ids"].tolist() == [[0, 8, 9], [0, 2, 3]]


class Windows:
    def __init__(self) -> None:
        self.n = 0

    def next_batch(self):
        self.n += 1
        rows = torch.arange(self.n, self.n + 33).repeat(2, 1)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_denoising_batches_resume_exactly():
    ids = SpecialIds(VOCAB, 20)
    a = DenoisingBatches(Windows(), "ul2", ids, DenoiseConfig(), encdec=False, seed=3)
    a.next_batch()
    state = a.state_dict()
    expected = a.next_batch()
    b = DenoisingBatches(Windows(), "ul2", ids, DenoiseConfig(), encdec=False, seed=3)
    b.load_state_dict(json.loads(json.dumps(state)))
    got = b.next_batch()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert got["input_ids"].shape[1] <= 32


def write_data(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    stream = np.resize(rng.integers(0, VOCAB, 40), 6000)
    with ShardWriter(directory / "train", VOCAB, max_shard_tokens=4000) as w:
        for doc in np.array_split(stream, 10):
            w.add(doc, n_bytes=len(doc))
    return directory


def run(tmp_path: Path, objective: str, preset: str, **model) -> dict:
    cfg = from_dict(PretrainConfig, {
        "run_dir": str(tmp_path / objective), "objective": objective,
        "denoise": {"n_sentinels": 16},
        "model": {"preset": preset, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64, **model},
        "data": {"path": str(write_data(tmp_path / "data")), "seq_len": 32, "batch_size": 4},
        "train": {"steps": 25, "lr": 3e-3, "warmup_steps": 2, "precision": "fp32", "device": "cpu",
                  "log_every": 5, "eval_every": 0, "save_every": 0, "plot_every": 0}})
    return pretrain(cfg)


def losses(result: dict) -> list[float]:
    rows = [json.loads(r) for r in (Path(result["model_dir"]).parent / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("objective,preset,model,vocab", [
    ("prefix_lm", "prefix-tiny", {"n_kv_heads": 2}, VOCAB),
    ("span_corruption", "t5-tiny", {"n_encoder_layers": 2}, VOCAB + 16),
    ("ul2", "prefix-tiny", {"n_kv_heads": 2}, VOCAB + 16 + 3),
])
def test_pretrain_with_each_objective(tmp_path, objective, preset, model, vocab):
    result = run(tmp_path, objective, preset, **model)
    curve = losses(result)
    assert result["steps"] == 25 and curve[-1] < curve[0]
    loaded = load_model(result["model_dir"])
    assert loaded.cfg.vocab_size == vocab and loaded.cfg.arch == ("encdec" if preset == "t5-tiny" else "decoder")
    assert loaded.cfg.prefix_lm == (preset != "t5-tiny")  # generate and eval then read prompts as the prefix


def test_cli_objective_and_encdec_needs_a_denoiser(tmp_path, capsys):
    data = write_data(tmp_path / "data")
    flags = ["--data.path", str(data), "--data.seq_len", "16", "--data.batch_size", "2", "--train.steps", "1",
             "--train.precision", "fp32", "--model.preset", "t5-tiny", "--model.d_model", "32",
             "--model.n_heads", "4", "--model.n_layers", "1", "--model.n_encoder_layers", "1"]
    assert main(["pretrain", "--run_dir", str(tmp_path / "a"), *flags]) == 1
    assert "objective" in capsys.readouterr().err
    assert main(["pretrain", "--run_dir", str(tmp_path / "b"), "--objective", "span_corruption", *flags]) == 0
