"""Held-out loss, perplexity and bits/byte of a decoder on token shards (pretraining's periodic evaluation)."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from lmforge.core.runtime import autocast, resolve_precision
from lmforge.data.loader import SequenceLoader
from lmforge.data.shards import ShardSet
from lmforge.train.objectives import causal_lm_loss


def evaluate_perplexity(model: torch.nn.Module, shards: ShardSet, seq_len: int, batch_size: int = 8,
                        max_batches: int = 50, device: torch.device | str = "cpu", precision: str = "fp32",
                        *, progress: bool = False) -> dict[str, float]:
    """Score sequential windows from the start of `shards`, each at most once.

    At most `max_batches` batches (0 = every window); the last batch is cut short rather than
    wrapping around to windows already scored. The model must already be on `device`; its
    train/eval mode is restored afterwards. Returns {"loss", "perplexity", "bits_per_byte", "tokens"};
    bits_per_byte is NaN when the shards carry no byte counts.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)  # type: ignore[arg-type]
    loader = SequenceLoader(shards, batch_size, seq_len, shuffle=False)
    n_windows = loader.n_windows if max_batches <= 0 else min(loader.n_windows, max_batches * batch_size)
    n_batches = math.ceil(n_windows / batch_size)
    total_nats, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in tqdm(range(n_batches), desc="eval", unit="batch", disable=not progress):
                inputs, targets = loader.next_batch()
                keep = min(batch_size, n_windows - i * batch_size)
                inputs, targets = inputs[:keep].to(device), targets[:keep].to(device)
                with autocast(device, precision):
                    logits = model(inputs)
                total_nats += causal_lm_loss(logits, targets, reduction="sum").item()
                total_tokens += targets.numel()
    finally:
        model.train(was_training)
    loss = total_nats / total_tokens
    bytes_per_token = shards.bytes_per_token
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": loss / math.log(2) / bytes_per_token if bytes_per_token > 0 else math.nan,
        "tokens": total_tokens,
    }
