import math

import pytest
import torch
from fakes import RepeatedBatch

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import build_optimizer, param_groups
from lmforge.train.pretrain import lm_loss
from lmforge.train.schedule import lr_at, resolve_warmup, wsd_decay_start, wsd_lr_at
from lmforge.train.trainer import train_loop


def test_lr_schedule_hand_checked_values():
    # peak 1, 4 warmup steps, 14 total, floor 0.1: cosine over the 10 steps after warmup
    lr = [lr_at(s, 1.0, 4, 14, 0.1) for s in range(16)]
    assert lr[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear from ~0 to the peak
    assert lr[4] == pytest.approx(1.0)  # cosine starts at the peak
    assert lr[9] == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * (1 + cos(pi/2)) / 2
    assert lr[6] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.2)) / 2)
    assert lr[14] == pytest.approx(0.1) and lr[15] == pytest.approx(0.1)  # floor at and after the end
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))  # monotone decay
    assert lr_at(0, 3e-4, 0, 10, 0.0) == pytest.approx(3e-4)  # no warmup
    assert lr_at(10, 3e-4, 0, 10, 0.0) == pytest.approx(0.0)


def test_wsd_schedule_hand_checked_values():
    # peak 1, 4 warmup steps, 20 total, floor 0.1, decay_fraction 0.2: the last 4 steps (16..19) decay
    lr = [lr_at(s, 1.0, 4, 20, 0.1, "wsd", 0.2) for s in range(22)]
    assert lr[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # same warmup as cosine; its end is the peak
    assert lr[4:17] == pytest.approx([1.0] * 13)  # stable at the peak (mid-stable: step 10) through decay start
    assert lr[17] == pytest.approx(0.55)  # t = 1/4: 0.1 + 0.9 * (1 - sqrt(1/4))
    assert lr[18] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert lr[19] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.75)))  # the last step is not yet at the floor
    assert lr[20] == pytest.approx(0.1) and lr[21] == pytest.approx(0.1)  # floor at and after the end
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))  # never rises after warmup
    assert lr_at(10, 1.0, 4, 20, 0.1) != lr[10]  # the default is still cosine


def test_wsd_decay_window():
    assert wsd_decay_start(4, 20, 0.2) == 16
    assert wsd_decay_start(0, 1000, 0.1) == 900
    assert wsd_decay_start(0, 10, 0.01) == 9  # at least one decay step
    assert wsd_decay_start(5, 10, 1.0) == 5  # never inside warmup: decay_fraction 1 decays right after it
    # decay_fraction 1 without warmup: a pure 1-sqrt decay from the peak over the whole run
    assert wsd_lr_at(0, 2.0, 0, 4, 0.0, 1.0) == pytest.approx(2.0)
    assert wsd_lr_at(1, 2.0, 0, 4, 0.0, 1.0) == pytest.approx(1.0)  # 2 * (1 - sqrt(1/4))
    assert wsd_lr_at(4, 2.0, 0, 4, 0.0, 1.0) == pytest.approx(0.0)


def test_train_config_schedule_options():
    cfg = from_dict(TrainConfig, {"schedule": "wsd", "decay_fraction": "0.5"}, "train.")
    assert cfg.schedule == "wsd" and cfg.decay_fraction == 0.5
    assert from_dict(TrainConfig, {}).schedule == "cosine"
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"^train.decay_fraction must be in \(0, 1\], got"):
            from_dict(TrainConfig, {"decay_fraction": bad})
    with pytest.raises(ConfigError, match="train.schedule: 'linear' is not one of cosine, wsd"):
        from_dict(TrainConfig, {"schedule": "linear"}, "train.")


def test_train_loop_follows_the_wsd_schedule(tmp_path):
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    cfg = from_dict(TrainConfig, {"steps": 10, "lr": 1e-3, "warmup_steps": 2, "min_lr_ratio": 0.0,
                                  "schedule": "wsd", "decay_fraction": 0.4, "precision": "fp32",
                                  "device": "cpu", "log_every": 1, "eval_every": 0, "save_every": 0,
                                  "plot_every": 0})
    train_loop(model_with(), lm_loss, RepeatedBatch((ids[:, :-1], ids[:, 1:])), cfg, tmp_path)
    logged = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r]  # [i]: step i's lr
    assert logged == pytest.approx([wsd_lr_at(s, 1e-3, 2, 10, 0.0, 0.4) for s in range(10)])
    assert logged[1:7] == pytest.approx([1e-3] * 6)  # warmup end .. decay start (10 - 0.4 * 10 = 6)
    assert logged[7] == pytest.approx(1e-3 * (1 - 0.5))  # t = 1/4


def test_warmup_default_is_one_percent():
    assert resolve_warmup(-1, 1000) == 10
    assert resolve_warmup(-1, 20) == 1  # at least one step
    assert resolve_warmup(5, 1000) == 5
    assert resolve_warmup(0, 1000) == 0


def model_with(**overrides) -> Transformer:
    return Transformer(from_dict(ModelConfig, {"preset": "debug", "vocab_size": 40, **overrides}))


def names_in(model: torch.nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_decay_only_weight_matrices():
    model = model_with(bias=True, norm="layernorm", position="learned")
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed, not_decayed = names_in(model, decay), names_in(model, no_decay)
    assert not decayed & not_decayed
    assert decayed | not_decayed == {n for n, _ in model.named_parameters()}
    assert "embed.weight" in not_decayed and "pos_embed.weight" in not_decayed
    assert "lm_head.weight" in decayed  # an untied head is an ordinary projection
    assert any(n.endswith("norm.bias") for n in not_decayed) and any(n.endswith(".bias") for n in not_decayed)
    assert all(not n.endswith(".bias") and "norm" not in n for n in decayed)
    for n, p in model.named_parameters():
        if n in decayed:
            assert p.dim() == 2


def test_tied_head_is_not_decayed_and_counted_once():
    model = model_with(tie_embeddings=True)
    decay, no_decay = param_groups(model, 0.1)
    assert any(p is model.embed.weight for p in no_decay["params"])
    assert not any(p is model.embed.weight for p in decay["params"])
    total = sum(len(g["params"]) for g in (decay, no_decay))
    assert total == len(list(model.parameters()))


def test_build_optimizer_uses_config_hyperparameters():
    model = model_with()
    cfg = from_dict(TrainConfig, {"lr": 1e-3, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.05})
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == 1e-3 and g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6
        assert g["fused"]  # CPU has a fused AdamW kernel


def test_train_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="train.steps must be positive"):
        from_dict(TrainConfig, {"steps": 0})
    with pytest.raises(ConfigError, match="train.min_lr_ratio"):
        from_dict(TrainConfig, {"min_lr_ratio": 1.5})
    with pytest.raises(ConfigError, match="train.precision"):
        from_dict(TrainConfig, {"precision": "int8"}, "train.")
