"""Reward model: head on the last response token, save/load, score_texts, and learning synthetic pairs."""

from __future__ import annotations

import json

import pytest
import torch
from textdata import preference_file
from tinymodels import mha_model as tiny_model
from tinymodels import save_checkpoint
from tinymodels import text_tokenizer as tiny_tokenizer

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.posttrain.pairs import near_miss, synthetic_pairs
from lmforge.posttrain.reward import RewardConfig, RewardModel, last_lengths, load_reward_model, run_reward, score_texts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = tiny_tokenizer()
    return save_checkpoint(tiny_model(tok.vocab_size), tok, tmp_path_factory.mktemp("reward") / "base")


def test_score_reads_the_last_real_token_and_ignores_padding():
    rm = RewardModel(tiny_model(64)).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    padded = rm.score(ids, torch.tensor([3, 5]))
    alone = rm.score(ids[:1, :3], torch.tensor([3]))
    torch.testing.assert_close(padded[0], alone[0])
    labels = torch.tensor([[IGNORE_INDEX, 4, 4, IGNORE_INDEX], [IGNORE_INDEX] * 3 + [4]])
    assert last_lengths(labels).tolist() == [3, 4]


def test_near_miss_is_wrong_but_well_formed():
    import random

    rng = random.Random(0)
    for answer in ["7", "a b c", "1 1 2", "x"]:
        for _ in range(20):
            wrong = near_miss(answer, rng)
            assert wrong != answer and len(wrong.split()) >= len(answer.split())
    assert all(p.chosen != p.rejected for p in synthetic_pairs(60))


def test_reward_model_learns_pairs_with_margin_and_round_trips(checkpoint, tmp_path):
    cfg = from_dict(RewardConfig, {"checkpoint": str(checkpoint), "run_dir": str(tmp_path / "rm"),
                                   "data": str(preference_file(tmp_path / "pairs.jsonl")), "heldout": 0.25,
                                   "margin": 0.5, "max_len": 32,
                                   "train": {"steps": 60, "lr": 3e-3, "device": "cpu", "eval_every": 0}})
    out = run_reward(cfg)
    assert out["heldout_accuracy"] >= 0.8 > out["heldout_accuracy_before"], out  # 40 held-out pairs; chance 0.5
    rm = load_reward_model(out["model_dir"])
    tok = tiny_tokenizer()
    pairs = synthetic_pairs(8, seed=1)
    scores = score_texts(rm, tok, [p.prompt for p in pairs], [p.chosen for p in pairs])
    assert len(scores) == 8 and all(isinstance(s, float) for s in scores)
    # the same text scores the same whatever its batch neighbours (padding is ignored)
    one = score_texts(rm, tok, [pairs[0].prompt], [pairs[0].chosen])
    assert one[0] == pytest.approx(scores[0], abs=1e-5)


def test_margin_loss_and_cli_bad_data(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "yes"}) + "\n")
    code = main(["reward", "--checkpoint", str(checkpoint), "--data", str(bad), "--run_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code != 0 and "bad.jsonl:1" in err and "Traceback" not in err
    code = main(["reward", "--run_dir", str(tmp_path / "r2")])
    assert code != 0 and "checkpoint" in capsys.readouterr().err


def test_ratings_become_per_pair_margins_llama2_style(checkpoint, tmp_path, capsys):
    from lmforge.data.formats import read_preference_pairs
    from lmforge.posttrain.pairs import EncodedPair, PairBatches, encode_pairs
    from lmforge.posttrain.reward import pair_margins

    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": "bad", "rating": rating}
            for i, rating in enumerate(["significantly better", "Better", "slightly better", "unsure", 3, None])]
    path = tmp_path / "rated.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    pairs = read_preference_pairs(path)
    assert [p.rating for p in pairs[:5]] == pytest.approx([1, 2 / 3, 1 / 3, 0, 1]) and pairs[5].rating is None
    encoded = encode_pairs(tiny_tokenizer(), pairs, 32)
    assert pair_margins(encoded, 0.25, 3.0).tolist() == pytest.approx([3, 2, 1, 0, 3, 0.25])  # LLaMA 2 "large"
    assert pair_margins(encoded, 0.25, 0.0).tolist() == pytest.approx([0.25] * 6)  # ratings ignored
    assert pair_margins(encoded[3:4], 0.0, 1.0) is None
    margins = pair_margins(encoded, 0.0, 1.0)
    batch = PairBatches(encoded, 3, 0, seed=1, extra={"margin": margins}).next_batch()
    first_ids = batch["input_ids"][:3]  # the margin travels with its own pair through the shuffle
    for row, m in zip(first_ids, batch["margin"]):
        index = next(i for i, e in enumerate(encoded) if row[:len(e.chosen.input_ids)].tolist() ==
                     list(e.chosen.input_ids))
        assert m.item() == pytest.approx(margins[index].item())
    assert isinstance(encoded[0], EncodedPair)
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "rating": "much better"}) + "\n")
    code = main(["reward", "--checkpoint", str(checkpoint), "--data", str(path), "--run_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code != 0 and "rated.jsonl:1" in err and "field 'rating'" in err
