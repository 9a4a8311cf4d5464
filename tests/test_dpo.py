"""DPO stage: reference log-probs computed once, margins rise, SimPO runs reference-free, clear errors."""

from __future__ import annotations

import pytest
import torch
from textdata import preference_file
from tinymodels import mha_model as tiny_model
from tinymodels import save_checkpoint
from tinymodels import text_tokenizer as tiny_tokenizer

from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.posttrain import dpo, losses
from lmforge.posttrain.dpo import DpoConfig, run_dpo
from lmforge.tokenizer.train import train_bpe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = tiny_tokenizer()
    return save_checkpoint(tiny_model(tok.vocab_size), tok, tmp_path_factory.mktemp("dpo") / "base")


def cfg_for(checkpoint, tmp_path, steps, **extra):
    return from_dict(DpoConfig, {"checkpoint": str(checkpoint), "run_dir": str(tmp_path / f"run{steps}"),
                                 "data": str(preference_file(tmp_path / "pairs.jsonl", 96)), "max_len": 32,
                                 "heldout": 0.25,
                                 "batch_size": 8, "train": {"steps": steps, "lr": 3e-3, "device": "cpu",
                                                            "eval_every": 0}, **extra})


def test_dpo_loss_is_the_tested_loss():
    args = [torch.tensor(v) for v in ([-5.0, -2.0], [-7.0, -1.0], [-6.0, -2.0], [-7.0, -2.0])]
    for got, want in zip(dpo.dpo_loss(*args, beta=0.2, loss_type="ipo"), losses.dpo_loss(*args, 0.2, "ipo")):
        torch.testing.assert_close(got, want)


def test_heldout_standard_errors_on_hand_computed_numbers():
    chosen, rejected = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 1.0, 1.0])  # margins 1, -1, 2
    err = dpo.preference_stderrs(chosen, rejected, chosen, rejected)
    assert err["preference_accuracy_stderr"] == pytest.approx(((2 / 3) * (1 / 3) / 2) ** 0.5)  # p = 2/3, n = 3
    assert err["logp_margin_stderr"] == pytest.approx((((1 / 3) ** 2 + (5 / 3) ** 2 + (4 / 3) ** 2) / 2 / 3) ** 0.5)
    assert dpo.preference_stderrs(*[torch.tensor([1.0])] * 4)["logp_margin_stderr"] == 0.0  # one pair: no spread


def test_reference_runs_only_before_training_and_margin_rises(checkpoint, tmp_path, monkeypatch):
    calls = []
    real = dpo.precompute_logps

    def counting(model, pairs, *args, **kwargs):
        calls.append(len(pairs))
        return real(model, pairs, *args, **kwargs)

    monkeypatch.setattr(dpo, "precompute_logps", counting)
    out = run_dpo(cfg_for(checkpoint, tmp_path, 30))
    ref_calls = calls[:2]  # train and held-out reference passes; later calls are the policy's evaluations
    assert ref_calls == [72, 24] and len(calls) == 4  # ref x2, policy before + after; none per step
    assert out["heldout_logp_margin"] > out["heldout_logp_margin_before"] + 1.0, out
    assert out["heldout_preference_accuracy"] >= 0.75 and out["heldout_reward_accuracy"] >= 0.75
    assert 0 < out["heldout_logp_margin_stderr"] < out["heldout_logp_margin"]  # the report's error bars


def test_ref_forward_is_never_called_in_the_loop(checkpoint, tmp_path, monkeypatch):
    """The reference model object: its forward runs only in the precompute (batches of 32) - not per step."""
    from lmforge.posttrain import models, stage

    forwards = []
    real_load = models.load_reference

    def load_and_count(*args):
        ref = real_load(*args)
        ref.register_forward_hook(lambda *a: forwards.append(1))
        return ref

    monkeypatch.setattr(stage, "load_reference", load_and_count)
    run_dpo(cfg_for(checkpoint, tmp_path, 4))
    n4 = len(forwards)
    forwards.clear()
    run_dpo(cfg_for(checkpoint, tmp_path, 12))
    assert len(forwards) == n4 == 3 + 1  # ceil(72/32) + ceil(24/32) precompute batches, whatever the steps


def test_simpo_and_hinge_run(checkpoint, tmp_path):
    out = run_dpo(cfg_for(checkpoint, tmp_path, 10, simpo=True, beta=2.0))
    assert out["heldout_logp_margin"] > out["heldout_logp_margin_before"]
    out = run_dpo(cfg_for(checkpoint, tmp_path, 11, loss_type="hinge", label_smoothing=0.0))
    assert out["steps"] == 11


def test_reference_with_another_tokenizer_is_refused(checkpoint, tmp_path):
    other = train_bpe(["completely different text for another vocabulary"] * 30, vocab_size=300, show_progress=False)
    ref = save_checkpoint(tiny_model(other.vocab_size), other, tmp_path / "other")
    with pytest.raises(LmforgeError, match="tokenizer .* differs"):
        run_dpo(cfg_for(checkpoint, tmp_path, 2, ref_checkpoint=str(ref)))
