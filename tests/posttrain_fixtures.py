"""Tiny tokenizer + model fixtures shared by the post-training tests (SFT, rejection sampling, Self-Instruct).

`tiny_tokenizer()` is a byte-level BPE (vocab 512, chat template included) trained on real text plus
synthetic task text; `tiny_model_dir(path)` saves a randomly initialized 2-layer d_model-64 Transformer
with that tokenizer beside it, i.e. what `lmforge pretrain` writes to RUN/model.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from textdata import SHAKESPEARE

from lmforge.model.config import ModelConfig
from lmforge.model.io import save_model
from lmforge.model.transformer import Transformer
from lmforge.tasks.suite import make_examples
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_bpe

VOCAB_SIZE = 512


@functools.cache
def tiny_tokenizer() -> Tokenizer:
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    tasks = "\n".join(f"{e.prompt}\n{e.answer}" for e in make_examples(600, seed=0))
    chunks = [text[i:i + 5000] for i in range(0, len(text), 5000)] + [tasks]
    return train_bpe(chunks, vocab_size=VOCAB_SIZE, show_progress=False)


def tiny_model_config(max_seq_len: int = 128) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB_SIZE, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                       max_seq_len=max_seq_len)


def tiny_model(seed: int = 0, max_seq_len: int = 128) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_model_config(max_seq_len))


def tiny_model_dir(path: str | Path, seed: int = 0, max_seq_len: int = 128) -> Path:
    """A model directory (weights, config.json, tokenizer files) as `lmforge pretrain` leaves in RUN/model."""
    path = Path(path)
    save_model(tiny_model(seed, max_seq_len), path)
    tiny_tokenizer().save(path)
    return path
