"""What every post-training stage shares: its config fields, and the setup and teardown around its loop.

Each stage (`sft`, `reward`, `dpo`, `ppo`, `grpo`) is: load the policy and tokenizer -> build its data ->
open RUN (config.json) -> measure "before" -> `apply_peft` -> `train_loop` with its own batches and loss
-> save the result with the tokenizer beside it -> report before/after. The algorithm file keeps only its
config fields, its batch source and its loss; `Stage` does the rest, in the order each stage calls it
(the order fixes the random-number stream, e.g. when LoRA initializes, so it stays with the stage).
`StageConfig` subclasses change a shared field's default by declaring it again with `run_dir_option`
or `train_option`: dataclass inheritance keeps the field where the base put it, so every stage lists
`checkpoint, run_dir, resume, seed, train, peft` first and spells them the same on the command line.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.core.config import option, save_config
from lmforge.peft.config import PeftConfig, apply_peft
from lmforge.posttrain.models import device_of, load_policy, load_reference, pad_id_of, save_result
from lmforge.train.config import Batches, Evaluate, LossFn, TrainConfig
from lmforge.train.trainer import train_loop

RUN_HOLDS = "config.json, checkpoints, metrics and RUN/model"


def run_dir_option(default: str, holds: str = RUN_HOLDS) -> Any:
    """The `run_dir` field with a stage's own default folder and a word on what it writes there."""
    return option(default, f"output folder: {holds}")


def train_option(help: str = "optimization", **defaults: Any) -> Any:
    """The `train` section with a stage's own defaults (a partial section on the CLI keeps the rest)."""
    return option(default_factory=functools.partial(TrainConfig, **defaults), help=help)


@dataclass
class RunConfig:
    """A model to start from and a folder to write to: what every post-training command takes."""

    checkpoint: str = option("", "model directory to start from, with tokenizer.json beside it (e.g. RUN/model "
                                 "of `lmforge pretrain` or `lmforge sft`)")
    run_dir: str = run_dir_option("runs/posttrain")


@dataclass
class StageConfig(RunConfig):
    """The fields of a stage that trains the policy: resumable run, seed, optimization, PEFT."""

    resume: bool = option(False, "continue from RUN/checkpoints/latest")
    seed: int = option(0, "seed of the data split and order, any new head's init, and rollout sampling")
    train: TrainConfig = train_option()
    peft: PeftConfig = option(default_factory=PeftConfig, help="parameter-efficient fine-tuning")


def open_run(cfg: RunConfig) -> Path:
    """Create RUN and write the resolved config there; every stage does this before its first output."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    return run_dir


class Stage:
    """One training stage's setup and teardown: the policy and tokenizer (loaded on construction), the run
    folder, PEFT, the shared `train_loop` call, and the saved result."""

    def __init__(self, name: str, cfg: StageConfig) -> None:
        self.name, self.cfg = name, cfg
        self.policy, self.tokenizer = load_policy(cfg.checkpoint, cfg.train.device)
        self.run_dir = Path(cfg.run_dir)

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)

    @property
    def device(self) -> Any:
        return device_of(self.policy)

    def reference(self, ref_checkpoint: str) -> nn.Module:
        """The frozen reference: `ref_checkpoint`, or a copy of the policy as loaded (before any training)."""
        return load_reference(ref_checkpoint, self.policy, self.tokenizer)

    def open(self) -> Path:
        return open_run(self.cfg)

    def add_peft(self) -> None:
        apply_peft(self.policy, self.cfg.peft)

    def fit(self, model: nn.Module, loss_fn: LossFn, batches: Batches, evaluate: Evaluate | None = None
            ) -> dict[str, Any]:
        """`train_loop` on `model` (the policy, or a module around it) with the stage's train/resume settings."""
        return train_loop(model, loss_fn, batches, self.cfg.train, self.run_dir, evaluate=evaluate,
                          resume=self.cfg.resume, desc=self.name)

    def save(self, folder: str = "model") -> Path:
        """The trained policy (adapter files under PEFT) with the tokenizer, in RUN/`folder`."""
        return save_result(self.policy, self.cfg.peft, self.run_dir / folder, self.cfg.checkpoint)


def summary(result: dict[str, Any], model_dir: Path, **figures: Any) -> dict[str, Any]:
    """A stage's return value: its own figures, then the loop's final loss and steps and the saved model."""
    return {**figures, "final_loss": result["final_loss"], "steps": result["steps"], "model_dir": str(model_dir)}


def before_after(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """`{k}_before` for every figure measured before training, then the same figures after it."""
    return {**{f"{k}_before": v for k, v in before.items()}, **{k: after.get(k) for k in before}}
