"""What a model does at one point of its training: held-out perplexity and a few sampled continuations.

Taken before and after a stage, the pair shows what the stage changed (the quickstart's pretraining).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.data.shards import ShardSet
from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.model.encdec import greedy_decode
from lmforge.tokenizer import Tokenizer
from lmforge.train.evaluate import evaluate_perplexity


def sample_texts(model: Transformer, tokenizer: Tokenizer, prompts: list[str], n_tokens: int) -> list[str]:
    """Sampled continuations; an encoder-decoder fills a masked span after each prompt instead (greedy)."""
    texts = []
    for i, prompt in enumerate(prompts):
        if model.cfg.arch == "encdec":
            sentinel = tokenizer.vocab_size  # the first sentinel id sits right past the tokenizer's ids
            with torch.no_grad():
                out = greedy_decode(model, torch.tensor([tokenizer.encode(prompt) + [sentinel]]), n_tokens)
            texts.append(prompt + "<span>" + tokenizer.decode([t for t in out[0].tolist() if t < sentinel]))
            continue
        params = SamplingParams(temperature=0.8, top_k=50, max_new_tokens=n_tokens, seed=i,
                                stop_token_ids=[tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        ids = generate(model, tokenizer.encode(prompt), params)
        texts.append(prompt + tokenizer.decode(ids))
    return texts


def val_metrics(model: Transformer, shards_dir: Path, seq_len: int) -> dict[str, float] | None:
    """Held-out perplexity and bits per byte on SHARDS_DIR/val (None for an encoder-decoder: it is a
    decoder-only measure)."""
    if model.cfg.arch == "encdec":
        return None
    return evaluate_perplexity(model, ShardSet(shards_dir / "val"), seq_len=seq_len, batch_size=8, max_batches=20)


def snapshot(model: Transformer, tokenizer: Tokenizer, shards_dir: Path, seq_len: int, prompts: list[str],
             n_tokens: int) -> dict[str, Any]:
    """{"val": val_metrics, "samples": sample_texts} of `model` as it is now."""
    return {"val": val_metrics(model, shards_dir, seq_len),
            "samples": sample_texts(model, tokenizer, prompts, n_tokens)}
