"""Training under PEFT: checkpoints hold only the trainable tensors and their optimizer state, and an
interrupted run resumed from them ends exactly where an uninterrupted run does."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tinymodels import DEBUG_VOCAB, debug_model

from lmforge.checkpoint.store import OPTIMIZER_NAME, TRAINABLE_NAME, latest_checkpoint
from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.peft import PeftConfig, apply_peft
from lmforge.train.config import TrainConfig
from lmforge.train.pretrain import lm_loss
from lmforge.train.trainer import train_loop


class Batches:
    """Batch i is a fixed function of i, so the position (saved and restored) decides what comes next."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.i, self.crash_after = 0, crash_after

    def next_batch(self):
        if self.crash_after is not None and self.i >= self.crash_after:
            raise KeyboardInterrupt
        x = torch.randint(0, DEBUG_VOCAB, (3, 13), generator=torch.Generator().manual_seed(self.i))
        self.i += 1
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def peft(method: str) -> PeftConfig:
    return from_dict(PeftConfig, {"method": method, "lora": {"r": 4, "dropout": 0.1, "dora": True,
                                                             "targets": ["q_proj", "v_proj", "up_proj"]},
                                  "prefix": {"n_tokens": 3, "hidden": 16}})


def run(method: str, run_dir, crash_after=None, resume=False, seed=0):
    model = debug_model(seed=0, dropout=0.1)  # the same base every time: it is what the checkpoint leaves out
    torch.manual_seed(seed)  # different adapter init on resume: it must be overwritten
    apply_peft(model, peft(method))
    cfg = from_dict(TrainConfig, {"steps": 6, "lr": 1e-2, "warmup_steps": 1, "precision": "fp32",
                                  "device": "cpu", "log_every": 1, "eval_every": 0, "save_every": 2,
                                  "plot_every": 0, "keep_checkpoints": 1})
    train_loop(model, lm_loss, Batches(crash_after), cfg, run_dir, resume=resume)
    return model


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_checkpoint_holds_only_the_adapter_and_resume_is_exact(method, tmp_path):
    full = run(method, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):  # dies fetching step 4's batch: the last checkpoint is step 2
        run(method, tmp_path / "resumed", crash_after=3)
    ckpt = latest_checkpoint(tmp_path / "resumed")
    assert ckpt.name == "step_000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["checksums.json", "config.json", OPTIMIZER_NAME, TRAINABLE_NAME,
                                                      "trainer_state.json"]
    trainable = {n: p for n, p in full.named_parameters() if p.requires_grad}
    saved = load_file(ckpt / TRAINABLE_NAME)
    assert set(saved) == set(trainable)
    optimizer_tensors = load_file(ckpt / OPTIMIZER_NAME)
    assert len(optimizer_tensors) == 2 * len(trainable)  # exp_avg and exp_avg_sq, trainable tensors only
    assert sum(t.numel() for t in optimizer_tensors.values()) == 2 * sum(p.numel() for p in trainable.values())

    resumed = run(method, tmp_path / "resumed", resume=True, seed=99)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_resume_with_another_peft_config_is_one_line(tmp_path):
    run("lora", tmp_path / "run")
    with pytest.raises(LmforgeError, match="trainable tensors differ from this run's"):
        run("prefix", tmp_path / "run", resume=True)
