"""Perplexity and bits-per-byte of a model on token shards (`lmforge eval`).

Loss is the mean next-token cross-entropy in nats over scored tokens; perplexity is exp(loss).
Bits-per-byte, loss / ln 2 / (bytes per token), divides out the tokenizer, so models with
different vocabularies compare on the same text (Gao et al., 2020, "The Pile", Sec. 5.1).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json, file_sha256
from lmforge.core.runtime import resolve_device, resolve_precision
from lmforge.data.shards import INDEX_NAME, ShardSet
from lmforge.eval.harness import results_table, run_tasks, strip_examples
from lmforge.eval.reasoning import search_eval
from lmforge.model import load_model
from lmforge.model.quant import QUANTIZE_HELP, Quantize, apply_quantize
from lmforge.peft.config import load_trained
from lmforge.posttrain.search import SearchSettings
from lmforge.tokenizer import Tokenizer
from lmforge.train.evaluate import evaluate_perplexity


@dataclass
class EvalConfig:
    checkpoint: str = option(help="model directory (config.json + model.safetensors)")
    data: str = option("", "a token shard directory (has index.json), or a directory holding val/ "
                           "(preferred) or train/ shard directories; empty skips perplexity")
    tasks: list[str] = option(default_factory=list, help="task YAML files or directories of them "
                                                         "(see `lmforge eval make-tasks`)")
    limit: int = option(0, "score at most this many examples per task; 0 = all")
    adapter: str = option("", "PEFT adapter directory to apply on top of the checkpoint")
    tokenizer: str = option("", "tokenizer directory for tasks; empty uses the checkpoint's tokenizer.json")
    output: str = option("", "write every result (and per-example task records) to this JSON file")
    seq_len: int = option(0, "tokens per scored window; 0 means the model's max_seq_len")
    batch_size: int = option(8, "windows per forward pass")
    max_batches: int = option(50, "stop after this many batches; 0 scores every window once")
    quantize: Quantize = option("none", QUANTIZE_HELP)
    device: str = option("auto", "cpu, cuda, cuda:N, or auto")
    precision: Literal["auto", "fp32", "bf16"] = option("fp32", "autocast precision of the forward pass")
    reasoning: bool = option(False, "run test-time search on held-out reasoning problems (methods, PRM and budgets "
                                    "under --search.*): accuracy, tokens and the test-time compute curve")
    search: SearchSettings = option(default_factory=SearchSettings, help="test-time search with --reasoning true "
                                                                         "(the options of `lmforge search`)")


def resolve_shard_dir(data: str | Path) -> Path:
    """`data` itself when it holds index.json, else its val/ split, else its train/ split."""
    root = Path(data)
    for candidate in (root, root / "val", root / "train"):
        if (candidate / INDEX_NAME).is_file():
            if candidate.name == "train" and candidate != root:
                print(f"lmforge eval: no val/ split in {root}; evaluating on {candidate}", file=sys.stderr)
            return candidate
    if not root.exists():
        raise LmforgeError(f"data: {root} does not exist")
    raise LmforgeError(f"data: no token shards in {root} (expected {INDEX_NAME}, val/{INDEX_NAME} or "
                       f"train/{INDEX_NAME}); run `lmforge data tokenize` first")


def eval_cmd(cfg: EvalConfig) -> int:

    for name in ("batch_size", "seq_len", "max_batches"):
        if getattr(cfg, name) < (1 if name == "batch_size" else 0):
            raise LmforgeError(f"{name} must be {'positive' if name == 'batch_size' else '>= 0'}, "
                               f"got {getattr(cfg, name)}")
    if not cfg.data and not cfg.tasks and not cfg.reasoning:
        raise LmforgeError("eval: nothing to do; pass --data SHARDS (perplexity), --tasks TASKS and/or "
                           "--reasoning true")
    if cfg.reasoning:
        cfg.search.require_scorers("search.")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if cfg.adapter:
        model = load_trained(cfg.checkpoint, cfg.adapter, device=str(device))
    else:
        model = load_model(cfg.checkpoint, device)
    apply_quantize(model, cfg.quantize, adapter=bool(cfg.adapter))
    record: dict = {"checkpoint": cfg.checkpoint, "adapter": cfg.adapter or None}
    if cfg.data:
        record.update(_perplexity(cfg, model, device, precision))
    if cfg.tasks:
        record["tasks"] = _tasks(cfg, model)
    if cfg.reasoning:
        record.update(search_eval(cfg.search, model, _tokenizer(cfg)))
    if cfg.output:
        atomic_write_json(cfg.output, record)
        print(f"results: {cfg.output}", file=sys.stderr)
    return 0


def _tokenizer(cfg: EvalConfig) -> Tokenizer:
    tok_dir = Path(cfg.tokenizer or cfg.checkpoint)
    if not (tok_dir / "tokenizer.json").is_file():
        raise LmforgeError(f"tasks and reasoning need a tokenizer: no tokenizer.json in {tok_dir} "
                           "(pass --tokenizer DIR)")
    return Tokenizer.load(tok_dir)


def _tasks(cfg: EvalConfig, model: torch.nn.Module) -> dict:

    results = run_tasks(model, _tokenizer(cfg), cfg.tasks, cfg.batch_size, cfg.limit, progress=True)
    print(results_table(results))
    print(json.dumps(strip_examples(results)))
    return results


def _perplexity(cfg: EvalConfig, model: torch.nn.Module, device: torch.device, precision: str) -> dict:
    shard_dir = resolve_shard_dir(cfg.data)
    shards = ShardSet(shard_dir)
    model_vocab = model.cfg.vocab_size
    if shards.vocab_size > model_vocab:
        raise LmforgeError(f"shards at {shard_dir} have vocab_size {shards.vocab_size}, larger than the "
                           f"checkpoint's {model_vocab} ({cfg.checkpoint}): mismatched tokenizer")
    tokenizer_file = Path(cfg.checkpoint) / "tokenizer.json"
    sha = shards.tokenizer_sha256
    if sha and tokenizer_file.is_file() and file_sha256(tokenizer_file) != sha:
        print(f"lmforge eval: warning: {tokenizer_file} differs from the tokenizer the shards at {shard_dir} "
              "were made with", file=sys.stderr)
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise LmforgeError(f"seq_len {seq_len} exceeds the checkpoint's max_seq_len {model.cfg.max_seq_len}")
    result = evaluate_perplexity(model, shards, seq_len, cfg.batch_size, cfg.max_batches, device, precision,
                                 progress=True)
    rows = [("checkpoint", cfg.checkpoint), ("data", str(shard_dir)), ("tokens", f"{result['tokens']:,}"),
            ("loss", f"{result['loss']:.4f}"), ("perplexity", f"{result['perplexity']:.3f}"),
            ("bits_per_byte", f"{result['bits_per_byte']:.4f}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    record = {"checkpoint": cfg.checkpoint, "data": str(shard_dir), "seq_len": seq_len, **result}
    if math.isnan(record["bits_per_byte"]):
        record["bits_per_byte"] = None  # JSON has no NaN
    print(json.dumps(record))
    return {k: v for k, v in record.items() if k != "checkpoint"}
