"""Tiny models shared by the PEFT tests: an lmforge debug model and a random HF LLaMA with its lmforge twin."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.core.config import from_dict
from lmforge.model import ModelConfig, Transformer

VOCAB = 100


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(from_dict(ModelConfig, {"preset": "debug", "vocab_size": VOCAB, **overrides})).eval()


def ids(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def write_hf_llama(root: Path) -> tuple[Path, Path]:
    """A random LlamaForCausalLM (GQA: 4 heads, 2 KV heads) on disk, and the same weights as lmforge."""
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf.convert import from_hf

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, intermediate_size=128,
                                      max_position_embeddings=64)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(root / "hf", safe_serialization=True)
    from_hf(root / "hf", root / "lmforge")
    return root / "hf", root / "lmforge"


def hf_model(hf_dir: Path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
