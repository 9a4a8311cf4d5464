"""Tiny fixtures for the RL/preference tests: a small BPE tokenizer with the chat template, tiny models.

Everything is small enough that a test file trains in seconds on one CPU core.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from textdata import SHAKESPEARE

from lmforge.model import ModelConfig, Transformer, save_model
from lmforge.posttrain.reward import RewardModel, save_reward_model
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_bpe


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Tokenizer:
    """A 320-token byte-level BPE on ~200 KB of real text (plus the chat special tokens)."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    chunks = [text[i:i + 2000] for i in range(0, len(text), 2000)]
    return train_bpe(chunks, vocab_size=320, show_progress=False)


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> Transformer:
    cfg = dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=128, vocab_size=vocab_size)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**cfg)).eval()


def save_checkpoint(model: Transformer, tokenizer: Tokenizer, directory: Path) -> Path:
    """A model directory as `lmforge pretrain` writes it: weights, config and tokenizer files."""
    save_model(model, directory)
    tokenizer.save(directory)
    return directory


def reward_model_dir(tokenizer: Tokenizer, directory: Path, seed: int = 1) -> Path:
    """A randomly initialized reward model as `lmforge reward` writes it: a score an RL run can learn to raise."""
    rm = save_reward_model(RewardModel(tiny_model(tokenizer.vocab_size, seed=seed)), directory)
    tokenizer.save(rm)
    return rm
