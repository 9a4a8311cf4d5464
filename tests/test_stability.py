"""Stability: spike detection + rollback on a poisoned batch, z-loss (fused == unfused), embedding-grad shrink."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import learnable_shards
from tinymodels import debug_model

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.data.loader import SequenceLoader
from lmforge.data.shards import ShardSet
from lmforge.model import Transformer
from lmforge.train.config import TrainConfig
from lmforge.train.fused_ce import linear_cross_entropy
from lmforge.train.metrics import read_metrics
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.pretrain import lm_loss, lm_loss_unfused
from lmforge.train.stability import SPIKES_NAME, SpikeDetector, shrink_embedding_gradient, z_loss
from lmforge.train.trainer import train_loop

VOCAB = 64


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    return debug_model(VOCAB, seed, max_seq_len=32, **overrides)


# ----------------------------------------------------------------------------------------------
# detector


def test_detector_hand_checked_threshold():
    det = SpikeDetector(k=3.0, window=4, warmup=3)
    assert not det.is_spike(1.0) and not det.is_spike(1.1)
    assert det.threshold() is None  # two losses: still warming up
    assert det.is_spike(float("nan")) and det.is_spike(float("inf"))  # non-finite is always a spike
    assert not det.is_spike(0.9)
    # window [1.0, 1.1, 0.9]: mean 1.0, population std sqrt(0.02 / 3) = 0.08165 -> 1.0 + 3 * 0.08165
    assert det.threshold() == pytest.approx(1.0 + 3 * (0.02 / 3) ** 0.5)
    assert det.is_spike(1.3) and list(det.losses) == [1.0, 1.1, 0.9]  # spikes stay out of the window
    assert not det.is_spike(1.2)
    assert not det.is_spike(1.0) and list(det.losses) == [1.1, 0.9, 1.2, 1.0]  # a window of 4
    flat = SpikeDetector(k=3.0, window=4, warmup=2)
    flat.is_spike(2.0), flat.is_spike(2.0)
    assert flat.threshold() == pytest.approx(2.0 + 3 * 0.02)  # std floor: 1% of the mean
    restored = SpikeDetector(3.0, 4, 3)
    restored.load_state_dict(det.state_dict())
    assert restored.threshold() == det.threshold()
    with pytest.raises(ConfigError, match="train.spike.warmup"):
        SpikeDetector(3.0, window=4, warmup=5)


# ----------------------------------------------------------------------------------------------
# a poisoned batch: rollback, skip, recover


def write_shards(directory) -> ShardSet:
    return learnable_shards(directory, VOCAB, 20000, 5000)


class Poisoned:
    """A loader whose micro-batch at data position `cursor` is replaced by uniformly random tokens."""

    def __init__(self, inner: SequenceLoader, cursor: int) -> None:
        self.inner, self.cursor, self.served_poison = inner, cursor, 0

    def next_batch(self):
        poisoned = self.inner.state_dict()["cursor"] == self.cursor
        inputs, targets = self.inner.next_batch()
        if not poisoned:
            return inputs, targets
        self.served_poison += 1
        g = torch.Generator().manual_seed(self.served_poison)
        garbage = torch.randint(0, VOCAB, (inputs.shape[0], inputs.shape[1] + 1), generator=g)
        return garbage[:, :-1], garbage[:, 1:]

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


BATCH, SEQ = 4, 16
STEPS, POISON_STEP, SAVE_EVERY, SKIP_AFTER = 40, 27, 5, 3


def spike_cfg(spike: dict | None = None, **overrides) -> TrainConfig:
    return from_dict(TrainConfig, {"steps": STEPS, "lr": 1e-2, "warmup_steps": 2, "precision": "fp32",
                                   "device": "cpu", "log_every": 1, "eval_every": 0, "save_every": SAVE_EVERY,
                                   "plot_every": 0, "spike": {"k": 6.0, "window": 20, "warmup": 10,
                                                              "skip_batches": SKIP_AFTER, **(spike or {})},
                                   **overrides})


def train_rows(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_poisoned_batch_rolls_back_skips_and_recovers(tmp_path):
    shards = write_shards(tmp_path / "data")
    poison_at = (POISON_STEP - 1) * BATCH  # data position (window cursor) of step 27's micro-batch
    clean = train_loop(tiny_model(), lm_loss, SequenceLoader(shards, BATCH, SEQ, shuffle=False), spike_cfg(),
                       tmp_path / "clean")
    assert not (tmp_path / "clean" / SPIKES_NAME).exists()  # no false alarms on the clean run

    batches = Poisoned(SequenceLoader(shards, BATCH, SEQ, shuffle=False), poison_at)
    result = train_loop(tiny_model(), lm_loss, batches, spike_cfg(), tmp_path / "poisoned")

    records = [json.loads(line) for line in (tmp_path / "poisoned" / SPIKES_NAME).read_text().splitlines()]
    assert len(records) == 1 and batches.served_poison == 1  # detected once, and never served again
    spike = records[0]
    assert spike["step"] == POISON_STEP and spike["loss"] > spike["threshold"]
    assert spike["rollback_to"] == 25  # the last checkpoint (save_every 5) before step 27
    assert spike["spike_batch_at"]["cursor"] == poison_at
    # skipped: the batches of steps 26 and 27 (since the checkpoint) and SKIP_AFTER more
    assert spike["skipped_from"]["cursor"] == 25 * BATCH
    assert spike["skipped_to"]["cursor"] == (POISON_STEP + SKIP_AFTER) * BATCH

    rows = read_metrics(tmp_path / "poisoned" / "metrics.jsonl")
    marker = [r for r in rows if "spike_loss" in r]
    assert marker == [{"step": POISON_STEP, "spike_loss": spike["loss"], "rollback_to": 25}]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, POISON_STEP)) + list(range(26, STEPS + 1))  # 26 is trained again
    assert result["steps"] == STEPS
    final_clean, final = clean["final_loss"], result["final_loss"]
    print(f"spike loss {spike['loss']:.3f} (threshold {spike['threshold']:.3f}); final loss "
          f"{final:.3f} vs clean run {final_clean:.3f}")
    assert final < 1.25 * final_clean + 0.1  # back to normal, not still recovering
    assert max(r["loss"] for r in train_rows(tmp_path / "poisoned")[POISON_STEP:]) < spike["threshold"]


@pytest.mark.slow
def test_nan_losses_roll_back_then_give_up(tmp_path):
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    calls = {"n": 0}

    def loss_fn(model, batch):  # one NaN loss at the 12th call, then normal: a transient fault
        calls["n"] += 1
        loss, extra = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 12 else loss), extra

    class Fixed:
        def next_batch(self):
            return ids[:, :-1], ids[:, 1:]

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    cfg = spike_cfg(steps=15, spike={"skip_batches": 0})
    result = train_loop(tiny_model(), loss_fn, Fixed(), cfg, tmp_path / "once")
    assert result["steps"] == 15
    (record,) = [json.loads(x) for x in (tmp_path / "once" / SPIKES_NAME).read_text().splitlines()]
    assert record["step"] == 12 and record["rollback_to"] == 10 and record["threshold"] is not None

    def always_nan_after_10(model, batch):
        calls["n"] += 1
        loss, extra = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] > 10 else loss), extra

    calls["n"] = 0
    with pytest.raises(LmforgeError, match="spiked again after 2 rollbacks to step 10"):
        train_loop(tiny_model(), always_nan_after_10, Fixed(), spike_cfg(spike={"max_rollbacks": 2}),
                   tmp_path / "always")


# ----------------------------------------------------------------------------------------------
# z-loss


def test_z_loss_hand_value():
    logits = torch.zeros(2, 3, 8)  # log Z = log 8 everywhere
    targets = torch.tensor([[1, 2, IGNORE_INDEX], [0, 0, 0]])
    assert z_loss(logits, targets).item() == pytest.approx(np.log(8) ** 2)
    logits[0, 2] = 100.0  # an ignored position does not count
    assert z_loss(logits, targets).item() == pytest.approx(np.log(8) ** 2)


@pytest.mark.parametrize("coef", [1e-4, 0.1])
@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_fused_z_loss_matches_unfused(coef, chunk_size):
    g = torch.Generator().manual_seed(0)
    hidden = (2 * torch.randn(3, 50, 16, generator=g)).requires_grad_()  # logits far from log Z = 0
    weight = torch.randn(97, 16, generator=g).requires_grad_()
    targets = torch.randint(0, 97, (3, 50), generator=g)
    targets[0, :10] = IGNORE_INDEX

    def reference():
        logits = F.linear(hidden, weight)
        return causal_lm_loss(logits, targets) + coef * z_loss(logits, targets)

    ref = reference()
    fused = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, z_loss=coef)
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    for a, b in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    plain = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    assert (fused - plain).item() == pytest.approx(coef * z_loss(F.linear(hidden, weight), targets).item(),
                                                   rel=1e-4)


def test_lm_loss_z_loss_fused_equals_unfused():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    batch = (ids[:, :-1], ids[:, 1:])
    fused, _ = lm_loss(model, batch, z_loss=1e-2)
    unfused, _ = lm_loss_unfused(model, batch, z_loss=1e-2)
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)
    assert fused.item() > lm_loss(model, batch)[0].item()


# ----------------------------------------------------------------------------------------------
# embedding-gradient shrink


@pytest.mark.parametrize("alpha", [0.5, 0.1])
def test_embedding_gradient_shrink(alpha):
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    batch = (ids[:, :-1], ids[:, 1:])

    def forward_backward(model):
        hidden = model(batch[0], return_hidden=True)
        loss, _ = lm_loss(model, batch)
        loss.backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_hidden, plain = forward_backward(tiny_model())
    model = tiny_model()
    handle = shrink_embedding_gradient(model.embed, alpha)
    hidden, shrunk = forward_backward(model)
    assert torch.equal(hidden, plain_hidden)  # forward unchanged, bit for bit
    for name, g in plain.items():
        if name == "embed.weight":
            if alpha == 0.5:  # a power of two: scaling commutes with the sums exactly
                assert torch.equal(shrunk[name], 0.5 * g)
            torch.testing.assert_close(shrunk[name], alpha * g, rtol=1e-5, atol=1e-9)  # fp32 rounding of the sums
        else:
            assert torch.equal(shrunk[name], g), name  # nothing else changes
    handle.remove()
    with pytest.raises(ConfigError, match="embed_grad_alpha"):
        shrink_embedding_gradient(model.embed, 0.0)


def test_train_loop_applies_and_removes_the_hook(tmp_path):
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))

    class Fixed:
        def next_batch(self):
            return ids[:, :-1], ids[:, 1:]

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    grads = {}
    for alpha in (1.0, 0.25):
        model = tiny_model()
        model.embed.weight.register_hook(lambda g, a=alpha: grads.setdefault(a, g.clone()))
        train_loop(model, lm_loss, Fixed(), spike_cfg(steps=1, spike={"k": 0.0}, embed_grad_alpha=alpha),
                   tmp_path / str(alpha))
        assert not model.embed._forward_hooks  # removed when training ends
    torch.testing.assert_close(grads[0.25], 0.25 * grads[1.0], rtol=0, atol=0)  # 1/4: exact


# ----------------------------------------------------------------------------------------------
# end to end: `lmforge pretrain` with every option of this module on


def test_cli_pretrain_with_stability_options(tmp_path, capsys):
    from lmforge.cli import main

    write_shards(tmp_path / "data" / "train")
    run = tmp_path / "run"
    flags = ["--run_dir", str(run), "--data.path", str(tmp_path / "data"), "--data.seq_len", "16",
             "--data.batch_size", "2", "--model.preset", "debug", "--model.max_seq_len", "32",
             "--train.steps", "12", "--train.grad_accum", "2", "--train.precision", "fp32", "--train.device", "cpu",
             "--train.log_every", "1", "--train.save_every", "4", "--train.plot_every", "0",
             "--train.optimizer", "adafactor", "--train.lr", "0.05", "--train.adafactor.beta1", "0.9",
             "--train.z_loss", "1e-4", "--train.embed_grad_alpha", "0.1",
             "--train.batch_ramp.start", "32", "--train.batch_ramp.tokens", "256",
             "--train.spike.k", "6", "--train.spike.warmup", "4", "--train.spike.window", "8"]
    assert main(["pretrain", *flags]) == 0
    assert "pretrain: 12 steps, final loss" in capsys.readouterr().out
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    # 32 + 32 t / 256 tokens: 1 micro-batch of 32 tokens until t = 128 (48 tokens, 1.5 rounds up), then 2
    assert [r["batch_tokens"] for r in rows[:5]] == [32, 32, 32, 32, 64] and rows[-1]["batch_tokens"] == 64
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert main(["pretrain", *flags[:-2], "--train.spike.window", "1"]) == 2  # a config error: one line
    err = capsys.readouterr().err
    assert "train.spike.warmup must be in [2, train.spike.window=1]" in err and "Traceback" not in err
