"""`lmforge pretrain`: token shards in, the LM objective, `train_loop` for the rest; a model directory out."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.core.config import option, require, save_config
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write, dir_lock, file_sha256, writable_dir
from lmforge.core.runtime import resolve_device, resolve_precision
from lmforge.data.loader import SequenceLoader
from lmforge.data.mixture import SourceConfig
from lmforge.data.shards import INDEX_NAME, ShardSet
from lmforge.model.config import ModelConfig
from lmforge.model.encdec import build_model
from lmforge.model.io import WEIGHTS_NAME, load_into, load_weights, save_model
from lmforge.parallel import DistributedRun, ParallelConfig, setup_parallel
from lmforge.parallel.checkpointing import apply_activation_checkpointing
from lmforge.parallel.launch import launch_pretrain, under_torchrun
from lmforge.parallel.run import data_slice
from lmforge.train.config import TrainConfig
from lmforge.train.curriculum import PhaseConfig, build_data_plan
from lmforge.train.denoise import DenoiseConfig, DenoisingBatches, Objective, SpecialIds, denoise_loss
from lmforge.train.evaluate import evaluate_perplexity
from lmforge.train.fused_ce import linear_cross_entropy
from lmforge.train.moe_balance import MoEBalancer
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.stability import z_loss as log_z_squared
from lmforge.train.trainer import train_loop

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class DataConfig:
    path: str = option("shards", "directory made by `lmforge data tokenize` (train/, optional val/, "
                                 "tokenizer.json)")
    seq_len: int = option(256, "tokens per training sequence")
    batch_size: int = option(16, "sequences per micro-batch")
    seed: int = option(0, "seed of the data order")
    sources: list[SourceConfig] = option(default_factory=list, help="a data mixture: shard directories (relative to "
                                         "data.path) with target weights, e.g. [{path=\"code\", weight=0.7}, "
                                         "...]; empty: data.path/train alone")
    phases: list[PhaseConfig] = option(default_factory=list, help="a curriculum: ordered phases [{name, tokens, "
                                       "sources, anneal}], each a token budget with its own mixture; sets "
                                       "train.steps")

    def __post_init__(self) -> None:
        require(self.seq_len >= 1, "data.seq_len", self.seq_len, "positive")
        require(self.batch_size >= 1, "data.batch_size", self.batch_size, "positive")
        for i, source in enumerate(self.sources):
            source.check(f"data.sources[{i}]")
        for i, phase in enumerate(self.phases):
            phase.check(f"data.phases[{i}]")


@dataclass
class PretrainConfig:
    run_dir: str = option("runs/pretrain", "where checkpoints, metrics, plots and the final model go")
    resume: bool = option(False, "continue from RUN/checkpoints/latest (starts fresh, with a note, if none)")
    init_from: str = option("", "start from this model directory's weights instead of a random init (continued "
                                "pretraining, e.g. context extension: recipes/extend-context.toml); model.* must "
                                "describe the same architecture")
    model: ModelConfig = option(default_factory=ModelConfig, help="model architecture")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training data"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimization"})
    objective: Objective = option("causal", "causal LM, prefix_lm (bidirectional prefix, loss after it), T5 "
                                            "span_corruption or ul2 (R/S/X denoisers); see lmforge.train.denoise")
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig, metadata={
        "help": "span corruption settings (objective = span_corruption/ul2)"})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={
        "help": "distributed training (torchrun): ddp/fsdp, tensor parallel, activation checkpointing"})
    nproc: int = option(1, "convenience launcher: run on this many local processes (torch.distributed elastic); "
                           "same as `torchrun --nproc-per-node N -m lmforge pretrain RECIPE`")



# ----------------------------------------------------------------------------------------------
# objective and entry point




def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], z_loss: float = 0.0
            ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token cross-entropy on an (inputs, targets) batch from `SequenceLoader`, plus
    z_loss * mean(log^2 Z) when z_loss > 0 (PaLM; train.z_loss).

    The LM head runs fused with the loss (`linear_cross_entropy`), so the logits are never materialized.
    """
    inputs, targets = batch
    hidden = model(inputs, return_hidden=True)
    return with_aux_losses(model, linear_cross_entropy(hidden, model.lm_head.weight, targets, z_loss=z_loss),
                           hidden, targets)


def lm_loss_unfused(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], z_loss: float = 0.0
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """`lm_loss` through materialized [B, T, vocab] logits: the reference (train.fused_ce=false)."""
    inputs, targets = batch
    hidden = model(inputs, return_hidden=True)
    logits = model.lm_head(hidden)
    loss = causal_lm_loss(logits, targets)
    return with_aux_losses(model, loss + z_loss * log_z_squared(logits, targets) if z_loss else loss,
                           hidden, targets)


def with_aux_losses(model: nn.Module, loss: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """`loss` plus the model's auxiliary losses (MoE balance/z, MTP: `Transformer.aux_losses`), each also
    reported as a metric; a plain model's loss comes back unchanged with no metrics."""
    aux = model.aux_losses(hidden, targets) if hasattr(model, "aux_losses") else {}
    if not aux:
        return loss, {}
    metrics = {"lm_loss": float(loss.detach()), **{f"{k}_loss": float(v.detach()) for k, v in aux.items()}}
    return loss + sum(aux.values()), metrics


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain a model on DATA/train shards; the result lands in RUN/model with the data's tokenizer.

    Under torchrun (or with --nproc N) every process runs this; `cfg.parallel` says how they split the work.
    """

    if cfg.nproc > 1 and not under_torchrun():
        return launch_pretrain(cfg)
    run = setup_parallel(cfg.parallel, cfg.train.device, log_dir=Path(cfg.run_dir) / "logs")
    try:
        owner = run is None or run.is_main
        with dir_lock(writable_dir(cfg.run_dir, "run_dir")) if owner else contextlib.nullcontext():
            return _pretrain(cfg, run)  # one owner per run_dir: a second run or --resume is refused
    finally:
        if run is not None:
            run.close()


def objective_ids(cfg: PretrainConfig, base_vocab: int) -> SpecialIds:
    """The sentinel/mode ids `cfg.objective` adds past the shards' vocab (none for causal and prefix_lm)."""
    cfg.denoise.check()
    if cfg.model.arch == "encdec" and cfg.objective == "causal":
        raise LmforgeError("model.arch='encdec' needs objective = prefix_lm, span_corruption or ul2")
    sentinels = cfg.denoise.n_sentinels if cfg.objective in ("span_corruption", "ul2") else 0
    return SpecialIds(base_vocab, sentinels, modes=cfg.objective == "ul2")


def _pretrain(cfg: PretrainConfig, run: DistributedRun | None) -> dict[str, Any]:

    data_dir = Path(cfg.data.path)
    plan = None
    if cfg.data.sources or cfg.data.phases:  # a mixture or curriculum over several shard sets

        plan = build_data_plan(cfg.data, cfg.train, **data_slice(cfg.data.batch_size, run))
        cfg = dataclasses.replace(cfg, train=plan.train)
        shards, train_dir = plan.shards, plan.shards.directory
    else:
        train_dir = data_dir / "train" if (data_dir / "train" / INDEX_NAME).is_file() else data_dir
        if not (train_dir / INDEX_NAME).is_file():
            raise LmforgeError(f"data.path: no token shards in {data_dir} (expected train/{INDEX_NAME}); "
                               "run `lmforge data tokenize` first")
        shards = ShardSet(train_dir)
    model_cfg = cfg.model
    if model_cfg.vocab_size == 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=shards.vocab_size)
    special = objective_ids(cfg, shards.vocab_size)
    if shards.vocab_size <= model_cfg.vocab_size < special.vocab_size:  # sentinels / UL2 modes past the tokenizer
        model_cfg = dataclasses.replace(model_cfg, vocab_size=special.vocab_size)
    if shards.vocab_size > model_cfg.vocab_size:
        raise LmforgeError(f"model.vocab_size {model_cfg.vocab_size} is smaller than the vocab_size "
                           f"{shards.vocab_size} of the shards in {train_dir}")
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise LmforgeError(f"data.seq_len {cfg.data.seq_len} exceeds model.max_seq_len "
                           f"{model_cfg.max_seq_len}")
    tokenizer = data_dir / TOKENIZER_FILES[0]
    if shards.tokenizer_sha256 and tokenizer.is_file() and file_sha256(tokenizer) != shards.tokenizer_sha256:
        print(f"warning: {tokenizer} is not the tokenizer the shards in {train_dir} were made with",
              file=sys.stderr)
    if cfg.objective != "causal" and model_cfg.arch == "decoder":  # generate and eval read prompts as the prefix
        model_cfg = dataclasses.replace(model_cfg, prefix_lm=True)
    elif model_cfg.prefix_lm and model_cfg.arch == "decoder":
        raise LmforgeError("model.prefix_lm: objective 'causal' trains a causal LM (prefix_lm, span_corruption "
                           "and ul2 make a prefix LM)")
    cfg = dataclasses.replace(cfg, model=model_cfg)
    run_dir = writable_dir(cfg.run_dir, "run_dir")
    save_config(cfg, run_dir / "config.json")

    loader = plan.loader if plan else SequenceLoader(shards, seq_len=cfg.data.seq_len, seed=cfg.data.seed,
                                                     **data_slice(cfg.data.batch_size, run))
    precision = resolve_precision(cfg.train.precision, resolve_device(cfg.train.device, "train.device"))
    evaluate = None
    val_dir = data_dir / "val"
    if (val_dir / INDEX_NAME).is_file():
        val = ShardSet(val_dir)
        if val.n_tokens > cfg.data.seq_len:
            def evaluate(model: nn.Module) -> dict[str, float | None]:
                r = evaluate_perplexity(model, val, cfg.data.seq_len, cfg.data.batch_size,
                                        cfg.train.eval_batches, device=next(model.parameters()).device,
                                        precision=precision)
                bpb = r["bits_per_byte"]
                return {"val_loss": r["loss"], "val_bpb": None if math.isnan(bpb) else bpb}
        else:
            print(f"note: {val_dir} has {val.n_tokens} tokens, fewer than data.seq_len+1; "
                  "skipping validation", file=sys.stderr)

    torch.manual_seed(cfg.train.seed)
    model = build_model(model_cfg)
    if cfg.init_from:  # continued pretraining: same shapes, possibly new RoPE scaling / max_seq_len

        load_into(model, load_weights(Path(cfg.init_from) / WEIGHTS_NAME), cfg.init_from)
    if run is None:  # DistributedRun.prepare applies it under torchrun
        n_ac = apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing, cfg.parallel.ac_every)
        if n_ac:
            print(f"pretrain: activation checkpointing on {n_ac} blocks", file=sys.stderr)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretrain: {n_params / 1e6:.2f}M parameters, {plan.n_tokens if plan else shards.n_tokens:,} training "
          f"tokens, run dir {run_dir}", file=sys.stderr)
    if plan:
        print(plan.table, flush=True)
    loss_fn = functools.partial(lm_loss if cfg.train.fused_ce else lm_loss_unfused, z_loss=cfg.train.z_loss)
    if cfg.objective != "causal":
        loader = DenoisingBatches(loader, cfg.objective, special, cfg.denoise, model_cfg.arch == "encdec",
                                  model_cfg.decoder_start_id, cfg.data.seed)
        loss_fn = functools.partial(denoise_loss, aux=with_aux_losses)
    if model_cfg.arch == "encdec":
        evaluate = None  # validation perplexity is a decoder-only measure
    if evaluate is not None and run is not None and run.pipelined:
        print("note: no validation with parallel.pipeline > 1 (no process holds the whole model); evaluate "
              f"{run_dir / 'model'} afterwards", file=sys.stderr)
        evaluate = None
    hooks = [plan.hook] if plan else []
    if model_cfg.moe_experts:  # expert-utilization metrics, and aux-loss-free bias updates when enabled

        hooks.append(MoEBalancer(model_cfg.moe_bias_update_rate))
    fixed = {"data.batch_size": cfg.data.batch_size, "data.seq_len": cfg.data.seq_len}
    result = train_loop(model, loss_fn, loader, cfg.train, run_dir, evaluate=evaluate, resume=cfg.resume,
                        desc="pretrain", on_step_end=hooks, parallel=run, fixed=fixed)

    model_dir = run_dir / "model"
    if run is None:
        save_model(model, model_dir)
    else:  # collective: the full weights gathered, written by rank 0
        run.save_model(model, model_dir)
    for name in TOKENIZER_FILES:
        if (data_dir / name).is_file():
            atomic_write(model_dir / name, lambda tmp, src=data_dir / name: shutil.copyfile(src, tmp))
    out = {"final_loss": result["final_loss"], "val_loss": result.get("val_loss"),
           "val_bpb": result.get("val_bpb"), "model_dir": str(model_dir), "steps": result["steps"],
           "tokens_per_s": result["tokens_per_s"]}
    val_text = "" if out["val_loss"] is None else f", val loss {out['val_loss']:.4f}"
    if out["val_bpb"] is not None:
        val_text += f", val bpb {out['val_bpb']:.4f}"
    print(f"pretrain: {out['steps']} steps, final loss {out['final_loss']:.4f}{val_text}, "
          f"{out['tokens_per_s']:,.0f} tokens/s -> {model_dir}")
    return out
