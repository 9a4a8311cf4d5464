"""`lmforge pretrain`: token shards in, the LM objective, `train_loop` for the rest; a model directory out."""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import option, save_config
from lmforge.errors import LmforgeError
from lmforge.files import atomic_write
from lmforge.model.config import ModelConfig
from lmforge.runtime import resolve_device, resolve_precision
from lmforge.train.fused_ce import linear_cross_entropy
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import TrainConfig, _require, train_loop

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class DataConfig:
    path: str = option("shards", "directory made by `lmforge data tokenize` (train/, optional val/, "
                                 "tokenizer.json)")
    seq_len: int = option(256, "tokens per training sequence")
    batch_size: int = option(16, "sequences per micro-batch")
    seed: int = option(0, "seed of the data order")

    def __post_init__(self) -> None:
        _require(self.seq_len >= 1, "data.seq_len", self.seq_len, "positive")
        _require(self.batch_size >= 1, "data.batch_size", self.batch_size, "positive")


@dataclass
class PretrainConfig:
    run_dir: str = option("runs/pretrain", "where checkpoints, metrics, plots and the final model go")
    resume: bool = option(False, "continue from RUN/checkpoints/latest (starts fresh, with a note, if none)")
    model: ModelConfig = option(default_factory=ModelConfig, help="model architecture")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training data"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimization"})



# ----------------------------------------------------------------------------------------------
# objective and entry point




def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
            ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token cross-entropy on an (inputs, targets) batch from `SequenceLoader`.

    The LM head runs fused with the loss (`linear_cross_entropy`), so the logits are never materialized.
    """
    inputs, targets = batch
    return linear_cross_entropy(model(inputs, return_hidden=True), model.lm_head.weight, targets), {}


def lm_loss_unfused(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """`lm_loss` through materialized [B, T, vocab] logits: the reference (train.fused_ce=false)."""
    inputs, targets = batch
    return causal_lm_loss(model(inputs), targets), {}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain a model on DATA/train shards; the result lands in RUN/model with the data's tokenizer."""
    from lmforge.data.loader import SequenceLoader
    from lmforge.data.shards import INDEX_NAME, ShardSet
    from lmforge.eval.perplexity import evaluate_perplexity, file_sha256
    from lmforge.model.io import save_model
    from lmforge.model.transformer import Transformer

    data_dir = Path(cfg.data.path)
    train_dir = data_dir / "train" if (data_dir / "train" / INDEX_NAME).is_file() else data_dir
    if not (train_dir / INDEX_NAME).is_file():
        raise LmforgeError(f"data.path: no token shards in {data_dir} (expected train/{INDEX_NAME}); "
                           "run `lmforge data tokenize` first")
    shards = ShardSet(train_dir)
    model_cfg = cfg.model
    if model_cfg.vocab_size == 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=shards.vocab_size)
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
    cfg = dataclasses.replace(cfg, model=model_cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")

    loader = SequenceLoader(shards, cfg.data.batch_size, cfg.data.seq_len, seed=cfg.data.seed)
    precision = resolve_precision(cfg.train.precision, resolve_device(cfg.train.device))
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
    model = Transformer(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretrain: {n_params / 1e6:.2f}M parameters, {shards.n_tokens:,} training tokens, "
          f"run dir {run_dir}", file=sys.stderr)
    loss_fn = lm_loss if cfg.train.fused_ce else lm_loss_unfused
    result = train_loop(model, loss_fn, loader, cfg.train, run_dir, evaluate=evaluate, resume=cfg.resume,
                        desc="pretrain")

    model_dir = run_dir / "model"
    save_model(model, model_dir)
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
