"""Serving benchmarks: continuous batching, prefix caching and chunked prefill, each against the same server without.

`--workload batching`: 32 concurrent chat requests (continuous batching) vs the same requests one at a time.

`lmforge serve` runs in its own process (as users run it); this process is the client. Each request
asks for exactly `--max-tokens` greedy tokens (`ignore_eos`), so both modes do the same work and must
return the same texts (checked). Throughput = completion tokens / wall time of the whole set; latency =
one request's send-to-last-byte time. Without `--checkpoint`, a random-init 6-layer d256 model and a
2,000-token BPE trained on the stdlib's documentation (`pydoc_data.topics`) are written to a temp dir.

The machine is shared and noisy, so the two modes alternate `--repeats` times and each keeps its fastest set.

`--workload prefix`: 32 chats sharing a ~1,000-token system prompt, all sent at once, against a server with
`--prefix-cache true` and one with `--prefix-cache false`: throughput and p50 time to first token (streamed).
`--workload mixed`: streams decoding while long prompts arrive, against `--prefill-chunk N` and
`--prefill-chunk 0` (whole prompts): p95 gap between a running stream's tokens. Both use a model with
max_seq_len 2048 (random init) and check that both servers wrote the same texts.

    .venv/bin/python benchmarks/serving.py [--workload batching|prefix|mixed] [--checkpoint DIR] [--requests 32]
        [--max-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import math
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
from common import machine_line, matmul_peak, report, script_command
from safetensors import safe_open

from lmforge.model import ModelConfig, Transformer, save_model
from lmforge.tokenizer.train import train_bpe

SHAPE = dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, max_seq_len=512)
QUESTIONS = ["What is the difference between a list and a tuple?", "Explain recursion to a child.",
             "Write a haiku about the sea.", "How do I read a file line by line?", "Name three prime numbers.",
             "Why is the sky blue?", "Summarize the plot of Hamlet.", "What does a compiler do?"]


def make_checkpoint(directory: Path, max_seq_len: int = 512) -> Path:
    from pydoc_data.topics import topics

    texts = list(topics.values())
    tok = train_bpe(texts, vocab_size=2000, show_progress=False)
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig(vocab_size=tok.vocab_size, **{**SHAPE, "max_seq_len": max_seq_len})), directory)
    tok.save(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, max_batch: int, *flags: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--checkpoint", str(checkpoint), "--port",
                             str(port), "--max-batch", str(max_batch), "--max-concurrent", str(4 * max_batch),
                             "--name", "bench", *flags])
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


@dataclass
class Stream:
    sent: float
    times: list[float]  # arrival of each chunk that carried text
    text: str


def stream_chat(client: httpx.Client, url: str, messages: list[dict], max_tokens: int) -> Stream:
    """One greedy chat request, streamed: when each piece of text arrived."""
    body = {"model": "bench", "messages": messages, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    sent, times, text = time.perf_counter(), [], []
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            piece = choices[0].get("delta", {}).get("content")
            if piece:
                times.append(time.perf_counter())
                text.append(piece)
    return Stream(sent, times, "".join(text))


def words(n: int, seed: int) -> str:
    """About n tokens of documentation text (the tokenizer's own domain), a different stretch per seed."""
    from pydoc_data.topics import topics

    text = " ".join(topics.values()).split()
    start = (seed * 7919) % (len(text) - n)
    return " ".join(text[start:start + n * 2 // 3])


def served(checkpoint: Path, flags: list[str], max_batch: int, work) -> tuple[object, dict]:
    """Start a server with `flags`, warm it up, run `work(client, url)`; its result and the server's /health."""
    port = free_port()
    proc = start_server(checkpoint, port, max_batch, *flags)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(limits=httpx.Limits(max_connections=64)) as client:
            stream_chat(client, url, [{"role": "user", "content": "warm up"}], 2)
            out = work(client, url)
            return out, client.get(url + "/health").json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def prefix_workload(checkpoint: Path, n: int, max_tokens: int) -> list[tuple]:
    system = {"role": "system", "content": words(1000, 0)}
    chats = [[system, {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}] for i in range(n)]

    def work(client, url):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            streams = list(pool.map(lambda m: stream_chat(client, url, m, max_tokens), chats))
        return time.perf_counter() - t0, streams

    results = {}
    for cache in ("true", "false"):
        (wall, streams), health = served(checkpoint, ["--prefix-cache", cache], n, work)
        results[cache] = (wall, streams, health)
    (on_wall, on, on_health), (off_wall, off, off_health) = results["true"], results["false"]
    same = sum(a.text == b.text for a, b in zip(on, off))
    print(f"\nprefix: identical texts {same}/{n}; prompt tokens prefilled {on_health['prefill_tokens']} with the "
          f"cache ({on_health['cached_tokens']} copied from it) vs {off_health['prefill_tokens']} without")
    ttft = lambda ss: statistics.median(s.times[0] - s.sent for s in ss)  # noqa: E731
    tokens = sum(len(s.times) for s in on)
    return [(f"chat requests/s, {n} chats sharing a ~1,000-token system prompt, prefix cache on vs off",
             n / on_wall, n / off_wall, True),
            (f"p50 time to first token, s, same (all {n} at once; {tokens} text chunks)", ttft(on), ttft(off), False)]


def mixed_workload(checkpoint: Path, n: int, max_tokens: int, chunk: int) -> list[tuple]:
    """`n` streams decode; 4 long prompts arrive, a quarter second apart. Counted: the gaps between a stream's
    tokens that overlap the time some long prompt waits for its first token."""
    shorts = [[{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}] for i in range(n)]
    longs = [[{"role": "user", "content": words(1500, i + 1)}] for i in range(4)]

    def work(client, url):
        with ThreadPoolExecutor(n + len(longs)) as pool:
            streams = [pool.submit(stream_chat, client, url, m, max_tokens) for m in shorts]
            time.sleep(0.3)  # the streams are decoding
            late = []
            for m in longs:
                late.append(pool.submit(stream_chat, client, url, m, 4))
                time.sleep(0.25)
            return [s.result() for s in streams], [s.result() for s in late]

    gaps, texts = {}, {}
    for flag in (str(chunk), "0"):
        (streams, late), _ = served(checkpoint, ["--prefill-chunk", flag, "--prefix-cache", "false"], 2 * n, work)
        windows = [(s.sent, s.times[0]) for s in late]
        gaps[flag] = [b - a for s in streams for a, b in zip(s.times, s.times[1:])
                      if any(a < end and b > start for start, end in windows)]
        texts[flag] = [s.text for s in streams + late]
        if len(gaps[flag]) < 2:
            raise RuntimeError(f"--prefill-chunk {flag}: the streams ended before the long prompts came; "
                               f"raise --max-tokens")
    same = sum(a == b for a, b in zip(texts[str(chunk)], texts["0"]))
    on, off = gaps[str(chunk)], gaps["0"]
    print(f"\nmixed: identical texts {same}/{len(texts['0'])}; stream tokens during the long prefills: {len(on)} "
          f"chunked, {len(off)} whole prompts (the streams' {len(texts['0']) - 4} x {max_tokens} in all)")
    figure = f"{n} streams while 4 prompts of ~1,500 tokens are prefilled: --prefill-chunk {chunk} vs 0"
    return [(f"p95 inter-token latency, s, {figure}", p95(on), p95(off), False),
            ("p50 inter-token latency, s, same", statistics.median(on), statistics.median(off), False),
            ("longest stall of a running stream, s, same", max(on), max(off), False)]


def param_count(checkpoint: Path) -> int:
    """Parameters in the checkpoint's safetensors files (read from their headers)."""
    total = 0
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def print_table(rows: list[tuple], command: str, decode_flops: float = 0.0) -> None:
    """(figure, lmforge, peer, higher is better) rows as RESULTS.md's table, printed and appended; the machine is
    the server's threads (it runs in its own process), not this client's. The limit is this CPU's fp32 matmul
    peak; `decode_flops` (2 x params x output tokens/s) is held against it when given."""
    machine = machine_line(parallel=f"{os.environ.get('OMP_NUM_THREADS', os.cpu_count())} threads")
    peak = matmul_peak(torch.float32)
    limit = f"matmul peak fp32 {peak / 1e9:.0f} GFLOP/s"
    if decode_flops:
        limit += f"; the concurrent decode runs 2 x params x tokens/s = {decode_flops / peak:.1%} of it"
    report([(figure, f"{ours:.3g}", f"{peer:.3g}", f"{ours / peer if higher_better else peer / ours:.2f}x")
            for figure, ours, peer, higher_better in rows], machine, command, limit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=["batching", "prefix", "mixed"], default="batching")
    ap.add_argument("--checkpoint", default="", help="model directory; empty builds a random 6-layer d256 model")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prefill-chunk", type=int, default=256, help="mixed: the chunked server's --prefill-chunk")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternated; the fastest counts")
    args = ap.parse_args()
    command = script_command()
    if args.workload != "batching":
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path(tmp) / "bench", 2048)
            if args.workload == "prefix":
                rows = prefix_workload(checkpoint, args.requests, args.max_tokens)
            else:
                rows = mixed_workload(checkpoint, args.requests, args.max_tokens, args.prefill_chunk)
        return print_table(rows, command)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path(tmp) / "bench")
        params = param_count(checkpoint)
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
    print_table(rows, command, decode_flops=2 * params * con.tokens / con.wall)


if __name__ == "__main__":
    main()
