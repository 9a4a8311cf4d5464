"""Serving benchmark: 32 concurrent chat requests (continuous batching) vs the same requests one at a time.

`lmforge serve` runs in its own process (as users run it); this process is the client. Each request
asks for exactly `--max-tokens` greedy tokens (`ignore_eos`), so both modes do the same work and must
return the same texts (checked). Throughput = completion tokens / wall time of the whole set; latency =
one request's send-to-last-byte time. Without `--checkpoint`, a random-init 6-layer d256 model and a
2,000-token BPE trained on the stdlib's documentation (`pydoc_data.topics`) are written to a temp dir.

The machine is shared and noisy, so the two modes alternate `--repeats` times and each keeps its fastest set.

    .venv/bin/python benchmarks/serving.py [--checkpoint DIR] [--requests 32] [--max-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from common import machine_line, table

from lmforge.model import ModelConfig, Transformer, save_model
from lmforge.tokenizer.train import train_bpe

SHAPE = dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, max_seq_len=512)
QUESTIONS = ["What is the difference between a list and a tuple?", "Explain recursion to a child.",
             "Write a haiku about the sea.", "How do I read a file line by line?", "Name three prime numbers.",
             "Why is the sky blue?", "Summarize the plot of Hamlet.", "What does a compiler do?"]


def make_checkpoint(directory: Path) -> Path:
    from pydoc_data.topics import topics

    texts = list(topics.values())
    tok = train_bpe(texts, vocab_size=2000, show_progress=False)
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig(vocab_size=tok.vocab_size, **SHAPE)), directory)
    tok.save(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, max_batch: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--checkpoint", str(checkpoint), "--port",
                             str(port), "--max-batch", str(max_batch), "--max-concurrent", str(4 * max_batch),
                             "--name", "bench"])
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models").raise_for_status()
            return proc
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("lmforge serve did not start") from None
            time.sleep(0.2)


def ask(client: httpx.Client, url: str, i: int, max_tokens: int) -> tuple[float, float, str, int]:
    """(start, end, text, completion tokens) of one greedy chat request."""
    body = {"model": "bench", "messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}],
            "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
    t = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    out = r.json()
    return t, time.perf_counter(), out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]


@dataclass
class Run:
    wall: float  # seconds for the whole set
    waited: list[float]  # per request: from the set's start (every client arrives at once) to its answer
    served: list[float]  # per request: from its own send to its answer
    texts: list[str]
    tokens: int


def run(url: str, n: int, max_tokens: int, concurrent: bool) -> Run:
    """n requests, sent all at once or one after another."""
    with httpx.Client(limits=httpx.Limits(max_connections=n)) as client:
        t0 = time.perf_counter()
        if concurrent:
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(lambda i: ask(client, url, i, max_tokens), range(n)))
        else:
            results = [ask(client, url, i, max_tokens) for i in range(n)]
        wall = time.perf_counter() - t0
    return Run(wall, [end - t0 for _, end, _, _ in results], [end - start for start, end, _, _ in results],
               [r[2] for r in results], sum(r[3] for r in results))


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20, method="inclusive")[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="", help="model directory; empty builds a random 6-layer d256 model")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternated; the fastest counts")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path(tmp) / "bench")
        port = free_port()
        proc = start_server(checkpoint, port, max_batch=args.requests)
        url = f"http://127.0.0.1:{port}"
        try:
            run(url, 2, 4, concurrent=False)  # warm-up
            seqs, cons = [], []
            for _ in range(args.repeats):  # alternate the modes; keep each one's fastest set (load only slows)
                seqs.append(run(url, args.requests, args.max_tokens, concurrent=False))
                cons.append(run(url, args.requests, args.max_tokens, concurrent=True))
            seq, con = min(seqs, key=lambda r: r.wall), min(cons, key=lambda r: r.wall)
            batch_seen = httpx.get(url + "/health").json()["max_batch_seen"]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    same = sum(a == b for a, b in zip(seq.texts, con.texts))
    # the server's threads (it runs in its own process), not this client's
    machine = machine_line(parallel=f"{os.environ.get('OMP_NUM_THREADS', os.cpu_count())} threads")
    command = (f"python benchmarks/serving.py --requests {args.requests} --max-tokens {args.max_tokens} "
               f"--repeats {args.repeats}")
    n = args.requests
    rows = [  # (figure, lmforge = all at once with continuous batching, peer = one at a time, higher is better)
        (f"output tokens/s, {n} chat requests x {args.max_tokens} greedy tokens: concurrent vs one at a time",
         con.tokens / con.wall, seq.tokens / seq.wall, True),
        (f"p50 latency, s, all {n} clients arriving at once (one at a time: they queue)",
         statistics.median(con.waited), statistics.median(seq.waited), False),
        ("p95 latency, s, same", p95(con.waited), p95(seq.waited), False),
        ("p50 latency of a request once sent, s (the cost of sharing each step)",
         statistics.median(con.served), statistics.median(seq.served), False),
    ]
    print(f"\nlargest batch decoded together: {batch_seen}; identical greedy texts in both modes: {same}/{n}")
    print()
    print(table([(figure, f"{ours:.3g}", f"{peer:.3g}", f"{ours / peer if higher_better else peer / ours:.2f}x")
                 for figure, ours, peer, higher_better in rows], machine, command))

if __name__ == "__main__":
    main()
