"""What every post-training stage shares: its config fields, and the setup and teardown around its loop.

Each stage (`sft`, `reward`, `dpo`, `ppo`, `grpo`) is: load the policy and tokenizer -> build its data ->
open RUN (config.json) -> measure "before" -> `apply_peft` -> `train_loop` with its own batches and loss
-> save the result with the tokenizer beside it -> report before/after. The algorithm file keeps only its
config fields, its batch source and its loss; `Stage` does the rest, in the order each stage calls it
(the order fixes the random-number stream, e.g. when LoRA initializes, so it stays with the stage).
Under torchrun (`parallel.data` ddp or fsdp) every process runs the same stage: `Stage` joins the process
group, hands `train_loop` this rank's slice of each global batch (so N processes see what one sees: the global
batch, the losses and the updates stay those of one process), and writes the result from rank 0 alone.
`StageConfig` subclasses change a shared field's default by declaring it again with `run_dir_option`
or `train_option`: dataclass inheritance keeps the field where the base put it, so every stage lists
`checkpoint, run_dir, resume, seed, train, peft` first and spells them the same on the command line.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmforge.core.config import option, save_config
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.parallel import DistributedRun, ParallelConfig, setup_parallel
from lmforge.parallel.checkpointing import apply_activation_checkpointing
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
    parallel: ParallelConfig = option(default_factory=ParallelConfig, help="distributed training under torchrun "
                                      "(ddp/fsdp over the global batch) and activation checkpointing; tensor "
                                      "parallelism is pretraining-only")


def open_run(cfg: RunConfig) -> Path:
    """Create RUN and write the resolved config there; every stage does this before its first output."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    return run_dir


def check_post_training_parallel(cfg: ParallelConfig, key: str = "parallel", peft: PeftConfig | None = None) -> None:
    """The parallel options a post-training stage honours: everything but tensor parallelism, and no data
    parallelism over a quantized (QLoRA) base, whose torchao weights DDP cannot broadcast nor FSDP shard."""
    if cfg.tensor > 1:
        raise ConfigError(f"{key}.tensor must be 1 for a post-training stage, got {cfg.tensor} (tensor parallelism "
                          f"is pretraining-only; shard a large model with --{key}.data fsdp)")
    if peft is not None and peft.lora.quantize != "none" and cfg.data != "none":
        raise ConfigError(f"peft.lora.quantize={peft.lora.quantize} runs in one process only (a quantized base "
                          f"cannot be replicated or sharded by {key}.data={cfg.data}); use {key}.data none, or LoRA "
                          "on a full-precision base")


def rank_rows(batch: Any, rank: int, world: int) -> Any:
    """Rank `rank`'s equal share of every tensor's first dimension (a dict of tensors; scalars stay whole)."""
    def part(v: Any) -> Any:
        if not isinstance(v, Tensor) or v.dim() == 0:
            return v
        if len(v) % world:
            raise LmforgeError(f"a batch of {len(v)} rows does not split evenly over {world} data-parallel ranks; "
                               f"make the batch size a multiple of {world}")
        n = len(v) // world
        return v[rank * n:(rank + 1) * n]
    return {k: part(v) for k, v in batch.items()} if isinstance(batch, dict) else type(batch)(map(part, batch))


class RankSlices:
    """This rank's share of each global batch of `batches` (`batches.rank_slice(batch, rank, world)` where the
    source defines one, e.g. chosen/rejected pairs, else `rank_rows`). Every rank draws the same global batch, so
    the loader position, and with it exact resume, is the same on every rank."""

    def __init__(self, batches: Batches, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world
        self._slice = getattr(batches, "rank_slice", rank_rows)

    def next_batch(self) -> Any:
        return self._slice(self.batches.next_batch(), self.rank, self.world)

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)


class Stage:
    """One training stage's setup and teardown: the process group (under torchrun), the policy and tokenizer
    (loaded on construction), the run folder, PEFT, the shared `train_loop` call, and the saved result."""

    def __init__(self, name: str, cfg: StageConfig) -> None:
        self.name, self.cfg = name, cfg
        check_post_training_parallel(cfg.parallel, peft=cfg.peft)
        self.run_dir = Path(cfg.run_dir)
        self.run: DistributedRun | None = setup_parallel(cfg.parallel, cfg.train.device, log_dir=self.run_dir / "logs")
        try:
            device = cfg.train.device if self.run is None else str(self.run.device)
            self.policy, self.tokenizer = load_policy(cfg.checkpoint, device)
        except BaseException:
            self.close()
            raise
        self.trained: nn.Module | None = None  # what `fit` trained, whole (None on ranks other than 0 under fsdp)

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)

    @property
    def device(self) -> Any:
        return device_of(self.policy)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (always, in one process)."""
        return self.run is None or self.run.is_main

    @property
    def dp_rank(self) -> int:
        return 0 if self.run is None else self.run.dp_rank

    @property
    def dp_size(self) -> int:
        return 1 if self.run is None else self.run.dp_size

    def check_divides(self, value: int, key: str) -> None:
        """A global batch field (`key` = `value`) must split into whole equal shares over the ranks."""
        if value % self.dp_size:
            raise ConfigError(f"{key} must be a multiple of the {self.dp_size} data-parallel processes (each takes an "
                              f"equal share of the global batch), got {value}")

    def reference(self, ref_checkpoint: str) -> nn.Module:
        """The frozen reference: `ref_checkpoint`, or a copy of the policy as loaded (before any training). Under
        torchrun every rank holds its own replica (no gradients, no optimizer state)."""
        return load_reference(ref_checkpoint, self.policy, self.tokenizer)

    def open(self) -> Path:
        if self.is_main:
            open_run(self.cfg)
        return self.run_dir

    def add_peft(self) -> None:
        """PEFT on the policy, its new weights drawn from `seed` (the same on every rank: FSDP shards each rank's
        own copy, it does not broadcast rank 0's)."""
        torch.manual_seed(self.cfg.seed)
        apply_peft(self.policy, self.cfg.peft)

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[nn.Module]:
        """`model` with whole parameters on this rank for the block (sampling, evaluation): see
        `DistributedRun.gathered`; a no-op in one process and under ddp."""
        if self.run is None:
            yield model
        else:
            with self.run.gathered(model):
                yield model

    def fit(self, model: nn.Module, loss_fn: LossFn, batches: Batches, evaluate: Evaluate | None = None, *,
            wrap: Callable[[nn.Module], nn.Module] | None = None, split: bool = True) -> dict[str, Any]:
        """`train_loop` on `model` (the policy, or `wrap(policy)`: a module around it) with the stage's
        train/resume/parallel settings; afterwards `self.trained` is the trained module, whole.

        Under torchrun each rank trains on its slice of every global batch (`split`; false when `batches` already
        serves this rank's own data, as RL rollouts do), and evaluation runs on gathered parameters."""
        cfg, run = self.cfg, self.run
        if run is None:  # DistributedRun.prepare applies it under torchrun
            n = apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing, cfg.parallel.ac_every)
            if n:
                print(f"{self.name}: activation checkpointing on {n} blocks", file=sys.stderr)
        else:
            if split:
                batches = RankSlices(batches, run.dp_rank, run.dp_size)
            if evaluate is not None:
                evaluate = self._gathered_evaluate(evaluate)
        result = train_loop(model, loss_fn, batches, cfg.train, self.run_dir, evaluate=evaluate, resume=cfg.resume,
                            desc=self.name, parallel=run)
        self.trained = self._whole(model, wrap)
        return result

    def _gathered_evaluate(self, evaluate: Evaluate) -> Evaluate:
        def run(model: nn.Module) -> dict[str, Any]:
            with self.gathered(model):
                return evaluate(model)
        return run

    def _whole(self, model: nn.Module, wrap: Callable[[nn.Module], nn.Module] | None) -> nn.Module | None:
        """The trained module with plain, whole parameters: `model` itself, except under fsdp, where rank 0
        rebuilds the stage's module on the CPU (policy, PEFT, `wrap`) and loads the gathered full state dict."""
        run = self.run
        if run is None or run.cfg.data != "fsdp":
            return model
        state = run.full_state_dict(model)  # collective; non-empty on rank 0 only
        if not run.is_main:
            return None
        policy, _ = load_policy(self.cfg.checkpoint, "cpu")
        apply_peft(policy, self.cfg.peft)
        plain = wrap(policy) if wrap is not None else policy
        plain.load_state_dict(state)
        self.policy = policy
        return plain

    def save(self, folder: str = "model") -> Path:
        """The trained policy (adapter files under PEFT) with the tokenizer, in RUN/`folder` (written by rank 0)."""
        if self.is_main:
            save_result(self.policy, self.cfg.peft, self.run_dir / folder, self.cfg.checkpoint)
        self.sync()
        return self.run_dir / folder

    def sync(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written the result); nothing in one process."""
        if self.run is not None:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group this stage joined (call last)."""
        if self.run is not None:
            self.run.close()


def summary(result: dict[str, Any], model_dir: Path, **figures: Any) -> dict[str, Any]:
    """A stage's return value: its own figures, then the loop's final loss and steps and the saved model."""
    return {**figures, "final_loss": result["final_loss"], "steps": result["steps"], "model_dir": str(model_dir)}


def before_after(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """`{k}_before` for every figure measured before training, then the same figures after it."""
    return {**{f"{k}_before": v for k, v in before.items()}, **{k: after.get(k) for k in before}}
