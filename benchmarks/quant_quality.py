"""What weight-only quantization costs in quality: held-out perplexity and greedy agreement, int8 / int4 vs fp32.

Trains a small LLaMA-shaped model (d_model 128, 4 layers, d_ff 384, the tests' 320-token BPE) briefly (8 x 64
tokens a step) on Python's own English docs (tests/textdata.py: PYDOC_ENGLISH), the last 10 % of the tokens held
out. Then, for fp32, `quantize_weights(model, 8, kernel="lmforge")` (lmforge's int8 kernel: `--quantize int8` on
CPU) and torchao's int8 and int4 (head included): perplexity on the held-out tokens
(128-token windows: a prefill, which lmforge's int8 layers compute from the dequantized weights), and greedy
agreement over 24 held-out prompts of 16 tokens, 32 new tokens each, decoded one by one: the share of
new tokens equal to fp32's before the first difference, and the share of prompts whose whole continuation is
identical. Prints a markdown table.

    .venv/bin/python benchmarks/quant_quality.py [--steps 300] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn.functional as F
from common import memory_bandwidth  # noqa: F401  (import order: puts tests/ on the path)
from textdata import PYDOC_ENGLISH
from tinymodels import text_tokenizer

from lmforge.core.config import from_dict
from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.model.quant import quantize_weights

SHAPE = dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=384, vocab_size=320, max_seq_len=128)
SEQ = 128


def train(ids: torch.Tensor, steps: int, batch: int = 8, seq: int = 64) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(from_dict(ModelConfig, SHAPE))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        window = torch.stack([ids[s:s + seq + 1] for s in starts])
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: train loss {loss.item():.3f}", flush=True)
    return model.eval()


@torch.no_grad()
def perplexity(model: Transformer, ids: torch.Tensor) -> float:
    n = (len(ids) - 1) // SEQ
    x = ids[: n * SEQ + 1]
    inputs, targets = x[:-1].view(n, SEQ), x[1:].view(n, SEQ)
    nats = sum(F.cross_entropy(model(i[None])[0], t, reduction="sum").item() for i, t in zip(inputs, targets))
    return math.exp(nats / targets.numel())


def greedy(model: Transformer, prompts: list[list[int]], n: int) -> list[list[int]]:
    """One prompt at a time (batch 1, as decoding runs: lmforge's int8 kernel serves up to 32 rows)."""
    return [generate(model, p, SamplingParams(greedy=True, max_new_tokens=n)) for p in prompts]


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[float, float]:
    """(share of new tokens equal to the reference's before the first difference, share of identical answers)."""
    prefix = 0
    for a, b in zip(reference, other):
        prefix += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    total = sum(len(a) for a in reference)
    return prefix / total, sum(a == b for a, b in zip(reference, other)) / len(reference)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = text_tokenizer()
    ids = torch.tensor(tokenizer.encode(PYDOC_ENGLISH.read_text(encoding="utf-8")[:400_000]))
    cut = int(len(ids) * 0.9)
    train_ids, held_out = ids[:cut], ids[cut:]
    model = train(train_ids, args.steps)
    prompts = [held_out[i:i + 16].tolist() for i in range(0, 24 * 200, 200)]
    reference = greedy(model, prompts, 32)
    rows = [f"| fp32 | {perplexity(model, held_out):.3f} | {1:.0%} | {1:.0%} |"]
    for bits, kernel in ((8, "lmforge"), (8, "torchao"), (4, "torchao")):
        q = copy.deepcopy(model)
        report = quantize_weights(q, bits, kernel=kernel)
        prefix, exact = agreement(reference, greedy(q, prompts, 32))
        rows.append(f"| int{bits} {kernel} ({len(report.quantized)} layers) | {perplexity(q, held_out):.3f} | "
                    f"{prefix:.0%} | {exact:.0%} |")
    print(f"\nheld-out tokens: {len(held_out)}, {args.steps} training steps\n")
    print("| weights | held-out perplexity | greedy agreement (tokens before first difference) | identical answers |")
    print("|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
