"""Data-mixture sampler overhead: MixtureLoader vs a plain SequenceLoader, as a share of a training step.

Two sources shaped like the quickstart's (1.6M tokens of code, 120k of docs, vocab 4096, random ids:
the loaders never look at the values) mixed 80/20, against one SequenceLoader over the same tokens;
both serve 16 x 256-token batches. The step is the quickstart's `tiny` model (forward, fused LM loss,
backward, AdamW) at the quickstart's precision. Goal: the mixture costs < 1 % of a step more than the
plain loader. The limit the step is held against is this CPU's matmul peak at that precision (its fraction
is a row); the rows are appended to benchmarks/RESULTS.md.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mixture.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_line, matmul_peaks, peak_line, report, script_command, training_step

from lmforge.core.config import from_dict
from lmforge.core.runtime import resolve_precision
from lmforge.data.loader import SequenceLoader
from lmforge.data.mixture import MixtureLoader, concat_shards
from lmforge.data.shards import ShardSet, ShardWriter
from lmforge.model import ModelConfig, Transformer
from lmforge.model.size import flops_per_token

VOCAB, SEQ, BATCH = 4096, 256, 16


def write_source(path: Path, n_tokens: int, mean_doc: int, seed: int) -> ShardSet:
    rng = np.random.default_rng(seed)
    with ShardWriter(path, VOCAB, eos_id=0) as w:
        done = 0
        while done < n_tokens:
            n = min(n_tokens - done, int(rng.integers(mean_doc // 4, 2 * mean_doc)))
            w.add(rng.integers(1, VOCAB, n), n_bytes=4 * n)
            done += n
    return ShardSet(path)


def per_batch_seconds(loader, n: int) -> float:
    for _ in range(5):
        loader.next_batch()
    start = time.perf_counter()
    for _ in range(n):
        loader.next_batch()
    return (time.perf_counter() - start) / n


def tiny_config() -> ModelConfig:
    return from_dict(ModelConfig, {"preset": "tiny", "vocab_size": VOCAB})


def step_seconds(steps: int, precision: str) -> float:
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    data = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    step = training_step(model, data[:, :-1], data[:, 1:], precision)
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=300, help="batches timed per loader")
    ap.add_argument("--steps", type=int, default=4, help="training steps timed")
    args = ap.parse_args()
    precision = resolve_precision("auto", torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        code = write_source(Path(tmp, "code"), 1_600_000, 4000, 0)
        docs = write_source(Path(tmp, "docs"), 120_000, 1500, 1)
        concat_shards([code.directory, docs.directory], Path(tmp, "all"))
        streams = [SequenceLoader(s, 1, SEQ, seed=k) for k, s in enumerate((code, docs))]
        mixed = MixtureLoader(streams, [0.8, 0.2], ["code", "docs"], BATCH)
        plain = SequenceLoader(ShardSet(Path(tmp, "all")), BATCH, SEQ)
        t_mix = per_batch_seconds(mixed, args.batches)
        t_plain = per_batch_seconds(plain, args.batches)
    t_step = step_seconds(args.steps, precision)
    peaks = matmul_peaks()
    of_peak = flops_per_token(tiny_config(), SEQ) * BATCH * SEQ / t_step / peaks[precision]
    rows = [
        ("batch fetch, ms (16 x 256 tokens)", f"{t_mix * 1e3:.3f}", f"{t_plain * 1e3:.3f} (SequenceLoader)",
         f"{t_mix / t_plain:.2f}x"),
        (f"batch fetch, % of a tiny-model step ({t_step:.2f} s, {precision})", f"{100 * t_mix / t_step:.3f} %",
         f"{100 * t_plain / t_step:.3f} % (SequenceLoader)", f"{t_mix / t_plain:.2f}x"),
        ("mixture overhead over the plain loader, % of a step (goal < 1 %)",
         f"{100 * (t_mix - t_plain) / t_step:.3f} %", "-", "-"),
        (f"the tiny-model step's FLOP/s, % of the {precision} matmul peak", f"{100 * of_peak:.1f} %", "-", "-"),
    ]
    report(rows, machine_line(extra=peak_line(peaks)), script_command(),
           f"the training step it is a share of, at {100 * of_peak:.0f} % of the {precision} matmul peak")
    return 0 if t_mix - t_plain < 0.01 * t_step else 1


if __name__ == "__main__":
    sys.exit(main())
