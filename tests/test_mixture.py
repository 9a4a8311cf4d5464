"""Data mixtures: the deficit schedule's exact shares, the loader's resume, the summary table, pretrain's logging."""

import json

import numpy as np
import pytest
import torch
from fakes import SOURCE_OFFSET as OFFSET
from fakes import mixture_source as make_source

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.data.loader import SequenceLoader
from lmforge.data.mixture import (
    DeficitSchedule,
    MixtureLoader,
    SourceConfig,
    concat_shards,
    format_table,
    plan_sources,
)
from lmforge.data.shards import ShardSet
from lmforge.train.pretrain import PretrainConfig, pretrain
from recipes import tiny_pretrain_config

SEQ = 8


def mixture(tmp_path, weights, sizes, batch_size=4, **kw) -> MixtureLoader:
    streams = [SequenceLoader(make_source(tmp_path / f"s{k}", k, n), 1, SEQ, seed=k) for k, n in enumerate(sizes)]
    return MixtureLoader(streams, weights, [f"s{k}" for k in range(len(sizes))], batch_size, **kw)


def sources_of(inputs: torch.Tensor) -> list[int]:
    return (inputs[:, 0] // OFFSET).tolist()


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.7, 0.2, 0.1], [1, 2, 3, 4, 5], [0.97, 0.01, 0.01, 0.01]])
def test_deficit_schedule_every_prefix_within_one_sequence(weights):
    schedule = DeficitSchedule(weights)
    picks = schedule.take(5000)
    w = np.asarray(weights) / sum(weights)
    counts = np.zeros(len(w))
    worst = 0.0
    for n, p in enumerate(picks, 1):
        counts[p] += 1
        worst = max(worst, np.abs(counts - w * n).max())
    assert worst < 1.0
    assert schedule.counts == counts.astype(int).tolist()
    assert np.array_equal(DeficitSchedule(weights).take(5000), picks)  # deterministic


def test_loader_hits_the_weights_and_reads_the_right_windows(tmp_path):
    loader = mixture(tmp_path, [3, 1], [40 * SEQ + 1, 40 * SEQ + 1])
    seen = []
    for _ in range(10):
        inputs, targets = loader.next_batch()
        assert inputs.shape == targets.shape == (4, SEQ) and torch.equal(targets[:, :-1], inputs[:, 1:])
        seen += sources_of(inputs)
        for row in inputs:  # each row is a real window of its source
            k, pos = divmod(int(row[0]), OFFSET)
            assert pos % SEQ == 0 and torch.equal(row, torch.arange(pos, pos + SEQ) + k * OFFSET)
    assert seen.count(0) == 30 and seen.count(1) == 10
    assert loader.tokens_by_source() == {"s0": 30 * SEQ, "s1": 10 * SEQ}


def test_state_dict_round_trip_resumes_mid_epoch(tmp_path):
    def run(n):
        return [loader.next_batch()[0] for _ in range(n)]

    loader = mixture(tmp_path, [0.6, 0.3, 0.1], [23 * SEQ + 1, 7 * SEQ + 1, 5 * SEQ + 1])
    run(5)
    state = json.loads(json.dumps(loader.state_dict()))  # it must survive the checkpoint's JSON
    uninterrupted = run(12)  # crosses epochs of the small sources
    resumed = mixture(tmp_path, [0.6, 0.3, 0.1], [23 * SEQ + 1, 7 * SEQ + 1, 5 * SEQ + 1])
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, [resumed.next_batch()[0] for _ in range(12)]))
    assert resumed.state_dict() == loader.state_dict()


def test_ranks_split_one_global_batch(tmp_path):
    whole = mixture(tmp_path, [2, 1], [30 * SEQ + 1, 30 * SEQ + 1], batch_size=6)
    ranks = [mixture(tmp_path, [2, 1], [30 * SEQ + 1, 30 * SEQ + 1], batch_size=3, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(3):
        assert torch.equal(whole.next_batch()[0], torch.cat([r.next_batch()[0] for r in ranks]))
    assert ranks[0].state_dict() == ranks[1].state_dict() == whole.state_dict()


def test_plan_table_and_max_epochs_error(tmp_path):
    streams = [SequenceLoader(make_source(tmp_path / f"s{k}", k, n), 1, SEQ) for k, n in enumerate([801, 161])]
    sources = [SourceConfig(path="a", weight=3), SourceConfig(path="b", weight=1, max_epochs=2)]
    plans = plan_sources(sources, streams, 80, "data.sources")  # 60 + 20 sequences; b has 20 windows
    assert [p.tokens for p in plans] == [60 * SEQ, 20 * SEQ] and plans[1].epochs == pytest.approx(1.0)
    table = format_table(plans, "data mixture")
    assert "tokens available" in table and "epochs" in table and "0.750" in table and "1.00" in table
    with pytest.raises(ConfigError, match=r"data.sources\[1\].max_epochs: source 'b'.*2.05 times"):
        plan_sources(sources, streams, 163, "data.sources")


@pytest.mark.parametrize(("source", "field"), [({"path": "a", "weight": -1}, "data.sources[1].weight"),
                                               ({"weight": 1}, "data.sources[1].path"),
                                               ({"path": "a", "order": "score"}, "data.sources[1].score_file"),
                                               ({"path": "a", "wieght": 1}, "data.sources[1].wieght")])
def test_config_errors_name_the_field(source, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        from_dict(PretrainConfig, {"data": {"sources": [{"path": "ok"}, source]}})


def test_concat_shards_keeps_documents_and_bytes(tmp_path):
    a, b = make_source(tmp_path / "a", 0, 100), make_source(tmp_path / "b", 1, 50, doc_len=7)
    index = concat_shards([a.directory, b.directory], tmp_path / "ab")
    ab = ShardSet(tmp_path / "ab")
    assert index["n_docs"] == a.n_docs + b.n_docs and ab.n_bytes == a.n_bytes + b.n_bytes
    assert np.array_equal(ab.read(0, ab.n_tokens), np.concatenate([a.read(0, 100), b.read(0, 50)]))
    assert ab.doc_ends().tolist() == a.doc_ends().tolist() + (b.doc_ends() + 100).tolist()


def test_pretrain_prints_the_table_and_logs_tokens_per_source(tmp_path, capsys):
    make_source(tmp_path / "code" / "train", 0, 3000, vocab=64)
    make_source(tmp_path / "docs", 1, 1000, vocab=64)
    cfg = tiny_pretrain_config(tmp_path, {"sources": [{"path": "code", "weight": 0.75},
                                                      {"path": "docs", "weight": 0.25, "max_epochs": 2}]})
    pretrain(cfg)
    out = capsys.readouterr().out
    assert "data mixture: 320 tokens over 5 steps" in out and "code" in out and "0.250" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 5]
    # 4 sequences of 16 tokens a step, 3:1 -> 48 code + 16 docs tokens per step, exactly at every row
    for r in rows:
        assert r["tokens.code"] == 48 * r["step"] and r["tokens.docs"] == 16 * r["step"]

    over = tiny_pretrain_config(tmp_path, {"sources": [{"path": "code", "weight": 0.75},
                                                       {"path": "docs", "weight": 0.25, "max_epochs": 2}]},
                                steps=200)
    with pytest.raises(ConfigError, match=r"data.sources\[1\].max_epochs"):
        pretrain(over)
