"""Batch-size ramp: hand-checked schedule numbers, config checks, and the loop (rows, tokens, exact resume)."""

import math

import pytest
import torch
from fakes import CrashAfter, learnable_shards
from tinymodels import debug_model

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.data.loader import SequenceLoader
from lmforge.data.shards import ShardSet
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import lm_loss
from lmforge.train.ramp import BatchRamp, ramp_from_config
from lmforge.train.schedule import lr_at
from lmforge.train.trainer import train_loop

VOCAB = 64


def walk(ramp: BatchRamp, steps: int) -> list[tuple[int, int]]:
    """(tokens_seen, grad_accum) of each step when every step adds accum * micro_tokens."""
    seen, out = 0, []
    for _ in range(steps):
        accum = ramp.grad_accum(seen)
        out.append((seen, accum))
        seen += accum * ramp.micro_tokens
    return out


def test_schedule_hand_checked_numbers():
    # 512-token micro-batches, target 8 of them (4096 tokens), from 1024 tokens over the first 10,000 tokens
    ramp = BatchRamp(start_tokens=1024, ramp_tokens=10_000, micro_tokens=512, target_accum=8)
    assert ramp.target_tokens == 4096
    # batch(t) = 1024 + 3072 * t / 10000: at t=1024 it is 1338.6 -> 2.61 micro-batches -> 3; at 2560,
    # 1810.4 -> 3.54 -> 4; at 4608, 2439.6 -> 4.76 -> 5; at 7168, 3226.0 -> 6.30 -> 6; from 10,000 on, 8
    assert walk(ramp, 8) == [(0, 2), (1024, 3), (2560, 4), (4608, 5), (7168, 6), (10240, 8), (14336, 8),
                             (18432, 8)]
    assert ramp.batch_tokens(5000) == pytest.approx(2560.0)
    assert ramp.lr_scale(0) == pytest.approx(0.5)  # sqrt(2 / 8)
    assert ramp.lr_scale(1024) == pytest.approx(math.sqrt(3 / 8))
    assert ramp.lr_scale(10_000) == 1.0
    linear = BatchRamp(1024, 10_000, 512, 8, "linear")
    assert linear.lr_scale(0) == pytest.approx(0.25) and linear.lr_scale(2560) == pytest.approx(0.5)
    assert BatchRamp(1024, 10_000, 512, 8, "none").lr_scale(0) == 1.0
    # a start below one micro-batch still takes one micro-batch
    assert BatchRamp(100, 10_000, 512, 8).grad_accum(0) == 1


def test_config_checks():
    with pytest.raises(ConfigError, match="train.batch_ramp.tokens"):
        from_dict(TrainConfig, {"batch_ramp": {"start": 1024}})
    with pytest.raises(ConfigError, match="train.batch_ramp.start"):
        from_dict(TrainConfig, {"batch_ramp": {"start": -1}})

    class Batches:
        def next_batch(self):
            return torch.zeros(2, 16, dtype=torch.long)  # 32 tokens

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    cfg = from_dict(TrainConfig, {"grad_accum": 4, "batch_ramp": {"start": 200, "tokens": 1000}})
    with pytest.raises(ConfigError, match="at most the target batch of 128 tokens"):
        ramp_from_config(cfg, Batches(), lambda b: b.numel())
    assert ramp_from_config(from_dict(TrainConfig, {}), Batches(), lambda b: b.numel()) is None


def write_shards(directory) -> ShardSet:
    return learnable_shards(directory, VOCAB, 6000, 2000)


def test_loop_ramps_logs_and_resumes_exactly(tmp_path):
    shards = write_shards(tmp_path / "data")
    # micro-batch 2 x 16 = 32 tokens, target 4 micro-batches = 128 tokens, from 32 tokens over 320 tokens
    cfg = from_dict(TrainConfig, {"steps": 8, "grad_accum": 4, "lr": 1e-2, "warmup_steps": 0, "precision": "fp32",
                                  "device": "cpu", "log_every": 1, "eval_every": 0, "save_every": 2,
                                  "plot_every": 0, "batch_ramp": {"start": 32, "tokens": 320}})
    expected = walk(BatchRamp(32, 320, 32, 4), 8)
    # 32 + 96 t/320: t=0 -> 1; 32 -> 41.6 -> 1; 64 -> 51.2 -> 2; 128 -> 70.4 -> 2; 192 -> 89.6 -> 3; 288 -> 118.4 -> 4
    assert [a for _, a in expected] == [1, 1, 2, 2, 3, 4, 4, 4]

    def run(run_dir, crash_after=None, resume=False):
        model = debug_model(VOCAB, 0, max_seq_len=32, dropout=0.1)
        loader = SequenceLoader(shards, batch_size=2, seq_len=16, seed=3)
        batches = loader if crash_after is None else CrashAfter(loader, crash_after)
        return train_loop(model, lm_loss, batches, cfg, run_dir, resume=resume), loader

    result, loader = run(tmp_path / "full")
    rows = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    assert [r["batch_tokens"] for r in rows] == [32 * a for _, a in expected]
    assert [r["tokens_seen"] for r in rows] == [t + 32 * a for t, a in expected]
    for r, (_, accum) in zip(rows, expected):  # the schedule's lr times sqrt(batch / full batch)
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 1e-2, 0, 8, 0.1) * math.sqrt(accum / 4))
    assert result["tokens_seen"] == 32 * sum(a for _, a in expected) == 672
    assert loader.state_dict()["cursor"] == 2 * sum(a for _, a in expected)  # windows served = the peek undone

    with pytest.raises(RuntimeError, match="crash"):  # dies inside step 6 (its checkpoint is at step 4)
        run(tmp_path / "resumed", crash_after=1 + sum(a for _, a in expected[:5]) + 1)  # +1: the peek
    run(tmp_path / "resumed", resume=True)
    resumed = [r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(rows, resumed):
        assert a["batch_tokens"] == b["batch_tokens"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_half_micro_batches_round_up():
    ramp = BatchRamp(32, 256, 32, 2)  # at t = 128 the ideal batch is 48 tokens: 1.5 micro-batches
    assert [ramp.grad_accum(t) for t in (96, 127, 128)] == [1, 1, 2]
