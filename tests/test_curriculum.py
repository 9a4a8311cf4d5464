"""Curricula: phase switches at the right step, resume across a boundary, score ordering, the anneal = WSD decay."""

import json
import shutil

import numpy as np
import pytest
import torch
from fakes import SOURCE_OFFSET as OFFSET
from fakes import mixture_source as make_source

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.data.loader import SequenceLoader
from lmforge.data.mixture import MixtureLoader
from lmforge.train.config import TrainConfig
from lmforge.train.curriculum import CurriculumLoader, build_data_plan, window_scores
from lmforge.train.pretrain import DataConfig, pretrain
from lmforge.train.schedule import lr_at
from recipes import tiny_pretrain_config

SEQ = 8


def curriculum(tmp_path, grad_accum=1) -> CurriculumLoader:
    """Phase 1: source 0 only (3 batches); phase 2: sources 1 and 2 at 1:1 (2 batches)."""
    streams = [SequenceLoader(make_source(tmp_path / f"s{k}", k, 30 * SEQ + 1), 1, SEQ, seed=k) for k in range(3)]
    phases = [MixtureLoader(streams[:1], [1.0], ["s0"], 4), MixtureLoader(streams[1:], [1, 1], ["s1", "s2"], 4)]
    return CurriculumLoader(phases, ["general", "special"], [3 * grad_accum, 2 * grad_accum], grad_accum)


def sources(batch) -> set[int]:
    return set((batch[0][:, 0] // OFFSET).tolist())


def test_phases_switch_at_the_right_step(tmp_path, capsys):
    loader = curriculum(tmp_path, grad_accum=2)
    served = [sources(loader.next_batch()) for _ in range(12)]
    assert served[:6] == [{0}] * 6 and all(s == {1, 2} for s in served[6:])  # the last phase goes on
    assert loader.switches == [(4, 1)]  # micro-batches 7-8 are optimizer step 4
    assert "phase 2/2 'special' starts at step 4 (192 tokens seen)" in capsys.readouterr().err
    assert loader.tokens_by_source() == {"s0": 6 * 4 * SEQ, "s1": 3 * 4 * SEQ, "s2": 3 * 4 * SEQ}


@pytest.mark.parametrize("cut", [2, 3, 4])  # before, at and after the boundary
def test_resume_across_a_phase_boundary(tmp_path, cut):
    loader = curriculum(tmp_path)
    for _ in range(cut):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    uninterrupted = [loader.next_batch()[0] for _ in range(6)]
    resumed = curriculum(tmp_path)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, [resumed.next_batch()[0] for _ in range(6)]))
    assert resumed.switches == ([(4, 1)] if cut <= 3 else [])  # a resume at the boundary still logs it


def test_length_order_serves_short_documents_first(tmp_path):
    from lmforge.data.shards import ShardSet, ShardWriter

    lengths = [40, 9, 25, 17, 60, 33]
    with ShardWriter(tmp_path, 64, eos_id=0) as w:
        for i, n in enumerate(lengths):
            w.add(np.full(n, i + 1))  # token value = document number + 1
    shards = ShardSet(tmp_path)
    scores = window_scores(shards, SEQ)
    loader = SequenceLoader(shards, 1, SEQ, seed=3, order_scores=scores)
    for _ in range(2):  # every epoch
        order = loader.next_windows(loader.n_windows)
        served = [lengths[int(shards.read(int(w) * SEQ, 1)[0]) - 1] for w in order]
        assert served == sorted(served) and sorted(order.tolist()) == list(range(loader.n_windows))


def plan_config(tmp_path, **train):
    make_source(tmp_path / "web", 0, 4000, vocab=64)
    make_source(tmp_path / "hq", 1, 2000, vocab=64)
    data = from_dict(DataConfig, {"path": str(tmp_path), "seq_len": 16, "batch_size": 4, "phases": [
        {"name": "general", "tokens": 640, "sources": [{"path": "web", "weight": 0.8}, {"path": "hq", "weight": 0.2}]},
        {"name": "anneal", "tokens": 320, "anneal": True, "sources": [{"path": "hq", "order": "length"}]}]})
    return data, TrainConfig(**{"steps": 1000, "warmup_steps": 2, "min_lr_ratio": 0.0, **train})


def test_anneal_phase_is_the_wsd_decay(tmp_path):
    data, train = plan_config(tmp_path)
    plan = build_data_plan(data, train)
    t = plan.train
    assert (t.steps, t.schedule) == (15, "wsd")  # 640 / 64 + 320 / 64 tokens per step
    lrs = [lr_at(s, 1.0, 2, t.steps, t.min_lr_ratio, t.schedule, t.decay_fraction) for s in range(t.steps + 1)]
    assert lrs[2:11] == [1.0] * 9 and lrs[11] < 1.0 and lrs[15] == 0.0  # decays from step 11 = anneal's 1st
    assert "phase 2/2 'anneal' (anneal): steps 11-15, 320 tokens" in plan.table
    assert " in all)" not in plan.table  # 'hq' by length is a stream of its own
    data.phases[1].sources[0].order = "shuffle"  # now phase 2 continues phase 1's 'hq' stream
    assert "0.16 (0.23 in all)" in build_data_plan(data, train).table  # 320/1984 and (128+320)/1984 tokens
    data.phases[1].sources[0].max_epochs = 0.2
    with pytest.raises(ConfigError, match=r"data.phases\[1\].sources\[0\].max_epochs: .*0.23 times"):
        build_data_plan(data, train)
    data.phases[1].sources[0].max_epochs = 0

    with pytest.raises(ConfigError, match=r"train.warmup_steps"):
        build_data_plan(data, TrainConfig(warmup_steps=12))
    data.phases[0].anneal = True
    with pytest.raises(ConfigError, match=r"data.phases\[0\].anneal"):
        build_data_plan(data, train)
    data.phases[0].anneal, data.phases[0].tokens = False, 10
    with pytest.raises(ConfigError, match=r"data.phases\[0\].tokens"):
        build_data_plan(data, train)
    with pytest.raises(ConfigError, match=r"data.phases\[1\].sources\[0\].weight"):
        from_dict(DataConfig, {"phases": [{"tokens": 1, "sources": [{"path": "a"}]},
                                          {"tokens": 1, "sources": [{"path": "a", "weight": 0}]}]})


def test_pretrain_switches_phase_logs_it_and_resumes_across_the_boundary(tmp_path, capsys):
    make_source(tmp_path / "web", 0, 4000, vocab=64)
    make_source(tmp_path / "hq", 1, 2000, vocab=64)
    phases = [{"name": "general", "tokens": 256, "sources": [{"path": "web", "weight": 3}, {"path": "hq"}]},
              {"name": "anneal", "tokens": 192, "anneal": True, "sources": [{"path": "hq", "order": "length"}]}]
    cfg = tiny_pretrain_config(tmp_path, {"phases": phases}, steps=1, save_every=3, keep_checkpoints=0,
                               min_lr_ratio=0.0)
    first = pretrain(cfg)
    captured = capsys.readouterr()
    assert first["steps"] == 7 and "phase 2/2 'anneal' starts at step 5 (256 tokens seen)" in captured.err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = {r["step"]: r for r in rows if "loss" in r}
    assert {s: r["phase"] for s, r in rows.items()} == {2: 0, 4: 0, 6: 1, 7: 1}
    assert rows[4]["tokens.web"] == 192 and rows[4]["tokens.hq"] == 64 and rows[7]["tokens.hq"] == 64 + 192
    assert rows[7]["lr"] < rows[4]["lr"] == pytest.approx(1e-3)

    # cut the run after step 3 (before the boundary) and resume: the same curve and weights
    uninterrupted = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    ckpts = tmp_path / "run" / "checkpoints"
    for later in ("step_000006", "step_000007"):
        shutil.rmtree(ckpts / later)
    (ckpts / "latest").write_text("step_000003")
    cfg.resume = True
    pretrain(cfg)
    assert "phase 2/2 'anneal' starts at step 5" in capsys.readouterr().err
    resumed = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in resumed if "loss" in r} == {s: r["loss"] for s, r in rows.items()}
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == uninterrupted


def test_recipe_parses():
    from pathlib import Path

    from lmforge.core.config import load_recipe
    from lmforge.train.pretrain import PretrainConfig

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "pretrain-mixture.toml"
    cfg = from_dict(PretrainConfig, load_recipe(recipe))
    assert [p.name for p in cfg.data.phases] == ["general", "specialized", "anneal"] and cfg.data.phases[2].anneal
    assert sum(p.tokens for p in cfg.data.phases) == 400 * cfg.data.batch_size * cfg.data.seq_len
