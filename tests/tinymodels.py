"""The tiny models and tokenizers the tests share: one place to build them, so every test file measures the
same small things.

- `debug_model(vocab)`: the `debug` preset (d_model 64, 2 layers, 4 heads, 2 KV heads, d_ff 128), seeded.
- `mha_model(vocab)`: the same shape as plain multi-head attention with the default MLP width (the RL,
  search and serving tests' model).
- `task_tokenizer()`: BPE (512 tokens, chat template) on real text plus synthetic task text, so SFT prompts
  tokenize compactly; `text_tokenizer()`: BPE (320 tokens) on real text only.
- `save_checkpoint` / `task_model_dir`: a model directory as `lmforge pretrain` leaves in RUN/model;
  `reward_model_dir`: a random reward model directory as `lmforge reward` leaves it.
- `write_hf_llama`: a random HF LLaMA on disk with its lmforge twin (PEFT parity tests).
Everything is small enough that a test file trains in seconds on one CPU core.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from textdata import PYDOC_ENGLISH

from lmforge.core.config import from_dict
from lmforge.model import ModelConfig, Transformer, save_model
from lmforge.model.hf.convert import from_hf
from lmforge.posttrain.reward import RewardModel, save_reward_model
from lmforge.tasks.suite import make_examples
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_bpe

DEBUG_VOCAB = 100  # debug_model's and random_ids' default vocabulary
TASK_VOCAB = 512  # task_tokenizer's vocabulary


def debug_model(vocab_size: int = DEBUG_VOCAB, seed: int = 0, **overrides) -> Transformer:
    """The `debug` preset with `overrides`, initialized under `seed`, in eval mode."""
    torch.manual_seed(seed)
    return Transformer(from_dict(ModelConfig, {"preset": "debug", "vocab_size": vocab_size, **overrides})).eval()


def mha_model(vocab_size: int, seed: int = 0, **overrides) -> Transformer:
    """The debug shape with as many KV heads as heads and the default (8/3 d_model) gated MLP."""
    return debug_model(vocab_size, seed, **{"n_kv_heads": 0, "d_ff": 0, **overrides})


def task_model(seed: int = 0, max_seq_len: int = 128) -> Transformer:
    """`debug_model` over `task_tokenizer`'s vocabulary."""
    return debug_model(TASK_VOCAB, seed, max_seq_len=max_seq_len)


def random_ids(seed: int = 1, batch: int = 2, length: int = 12, vocab_size: int = DEBUG_VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@functools.cache
def bpe_tokenizer(vocab_size: int, chunk_chars: int, task_text: bool) -> Tokenizer:
    """Byte-level BPE (chat special tokens included) on the first 200 KB of real text cut into `chunk_chars`
    pieces, plus 600 synthetic task prompts and answers when `task_text`. The text is Python's own English docs,
    so the tokenizer (and every seeded test built on it) is the same whether or not shared/data is beside the
    checkout."""
    text = PYDOC_ENGLISH.read_text(encoding="utf-8")[:200_000]
    chunks = [text[i:i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    if task_text:
        chunks.append("\n".join(f"{e.prompt}\n{e.answer}" for e in make_examples(600, seed=0)))
    return train_bpe(chunks, vocab_size=vocab_size, show_progress=False)


def task_tokenizer() -> Tokenizer:
    return bpe_tokenizer(TASK_VOCAB, 5000, True)


def text_tokenizer() -> Tokenizer:
    return bpe_tokenizer(320, 2000, False)


def save_checkpoint(model: Transformer, tokenizer: Tokenizer, directory: str | Path) -> Path:
    """A model directory as `lmforge pretrain` writes it: weights, config and tokenizer files."""
    directory = Path(directory)
    save_model(model, directory)
    tokenizer.save(directory)
    return directory


def task_model_dir(path: str | Path, seed: int = 0, max_seq_len: int = 128) -> Path:
    """`task_model` saved with `task_tokenizer` beside it."""
    return save_checkpoint(task_model(seed, max_seq_len), task_tokenizer(), path)


def reward_model_dir(tokenizer: Tokenizer, directory: Path, seed: int = 1) -> Path:
    """A randomly initialized reward model (on `mha_model`) as `lmforge reward` writes it: a score an RL run can
    learn to raise."""
    save_reward_model(RewardModel(mha_model(tokenizer.vocab_size, seed=seed)), directory)
    tokenizer.save(directory)
    return Path(directory)


def write_hf_llama(root: Path, vocab_size: int = DEBUG_VOCAB) -> tuple[Path, Path]:
    """A random LlamaForCausalLM (GQA: 4 heads, 2 KV heads) in root/hf, and the same weights as lmforge in
    root/lmforge."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=vocab_size, intermediate_size=128,
                                      max_position_embeddings=64)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(root / "hf", safe_serialization=True)
    from_hf(root / "hf", root / "lmforge")
    return root / "hf", root / "lmforge"


def hf_model(hf_dir: Path):
    """The HF model `write_hf_llama` saved, in fp32 and eval mode."""
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
