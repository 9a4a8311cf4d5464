"""Tokenize-and-pack throughput: `lmforge data tokenize` vs datatrove's DocumentTokenizer, same tokenizer.json,
same JSONL input, same worker count (1, in process, and --workers), document shuffling on in both; one run each.

The corpus is this machine's Python stdlib source (code + docstrings) plus pydoc's English topics, split
into max(2, --workers) JSONL files (datatrove runs one task per file). A byte-level BPE is trained on the first
few MB and saved once; both tools load that `tokenizer.json` and append eos to every document, so they
must produce the same number of tokens (checked). Reported: MB of UTF-8 text per second into shards, and, for
the in-process single-worker runs, MB per CPU-second (steadier than wall time on a shared machine). The limit
it is held against: N workers each as fast as the in-process run per CPU-second (a row gives the fraction); which
encoder lmforge used (tiktoken or HF tokenizers, `lmforge.tokenizer.fast`) is printed and in the machine column.
Appends its rows to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/tokenize_pack.py --mb 30 --workers 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import resource
import time
from pathlib import Path

from common import machine_line, report, scratch_dir, script_command

from lmforge.data.corpus import interleave, pydoc_topic_documents, stdlib_code_documents
from lmforge.data.shards import ShardSet
from lmforge.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, Tokenizer
from lmforge.tokenizer.fast import tiktoken_encoding
from lmforge.tokenizer.pack import tokenize_to_shards
from lmforge.tokenizer.train import train_bpe


def build_corpus(out: Path, max_mb: float, n_files: int) -> tuple[list[Path], int]:
    """Stdlib documents (cycled if the stdlib is smaller than asked) round-robin into `n_files` JSONL files."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"part{i:02d}.jsonl" for i in range(n_files)]
    handles = [open(f, "w", encoding="utf-8") for f in files]
    docs = list(interleave(stdlib_code_documents(), pydoc_topic_documents()))
    total = 0
    for i, doc in enumerate(itertools.cycle(docs)):
        if total >= max_mb * 1e6:
            break
        handles[i % n_files].write(json.dumps({"text": doc["text"]}) + "\n")
        total += len(doc["text"].encode("utf-8"))
    for h in handles:
        h.close()
    return files, total


def cpu_seconds() -> float:
    """User + system CPU of this process (all its threads: the tokenizers' Rust pool included)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def run_lmforge(files: list[Path], tok: Tokenizer, out: Path, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    tokenize_to_shards(files, tok, out, val_fraction=0.0, seed=0, workers=workers, shuffle=True,
                       batch_docs=256)
    seconds = time.perf_counter() - start
    return seconds, ShardSet(out / "train").n_tokens


def run_datatrove(files: list[Path], tokenizer_json: Path, out: Path, workers: int) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    logging.getLogger("datatrove").setLevel(logging.WARNING)
    executor = LocalPipelineExecutor(
        pipeline=[JsonlReader(str(files[0].parent), glob_pattern="*.jsonl"),
                  DocumentTokenizer(str(out / "tokens"), tokenizer_name_or_path=str(tokenizer_json),
                                    eos_token=SPECIAL_TOKENS["eos"], shuffle_documents=True, seed=0)],
        tasks=len(files), workers=workers, logging_dir=str(out / "logs"),
        start_method="fork")  # as lmforge's workers start (its default, forkserver, re-imports this script)
    start = time.perf_counter()
    executor.run()
    seconds = time.perf_counter() - start
    n_bytes = sum(p.stat().st_size for p in (out / "tokens").glob("*.ds"))
    return seconds, n_bytes // 2  # uint16 tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=30.0, help="corpus size in MB of text")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    with scratch_dir("lmforge-bench-tokenize-", keep=args.keep) as tmp:
        files, n_bytes = build_corpus(tmp / "in", args.mb, n_files=max(args.workers, 2))
        sample = (json.loads(line)["text"] for line in itertools.islice(open(files[0], encoding="utf-8"), 2000))
        tok = train_bpe(sample, vocab_size=args.vocab, show_progress=False)
        tok.save(tmp / "tok")
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
        mb = n_bytes / 1e6
        encoder = "tiktoken" if tiktoken_encoding(tok.canonical_json()) is not None else "HF tokenizers"
        machine = machine_line(parallel=f"{os.cpu_count()} cores", extra=f"lmforge encodes with {encoder}")
        command = script_command()
        rows, mb_per_s = [], {}
        for workers in sorted({1, args.workers}):
            label = f"{workers} worker{'s' if workers > 1 else ''}"
            cpu0 = cpu_seconds()
            lm_s, lm_tokens = run_lmforge(files, tok, tmp / f"lmforge{workers}", workers)
            cpu1 = cpu_seconds()
            dt_s, dt_tokens = run_datatrove(files, tmp / "tok" / TOKENIZER_FILE, tmp / f"datatrove{workers}",
                                            workers)
            lm_cpu, dt_cpu = cpu1 - cpu0, cpu_seconds() - cpu1
            mb_per_s[workers] = (mb / lm_s, mb / dt_s)
            rows += [
                (f"tokenize + pack, MB/s of text, {label}", f"{mb / lm_s:.2f}", f"{mb / dt_s:.2f}",
                 f"{dt_s / lm_s:.2f}x"),
                (f"wall time, s, {label}", f"{lm_s:.1f}", f"{dt_s:.1f}", f"{dt_s / lm_s:.2f}x"),
                (f"tokens written (incl. eos), {label}", f"{lm_tokens:,}", f"{dt_tokens:,}",
                 "same" if lm_tokens == dt_tokens else f"{lm_tokens / max(dt_tokens, 1):.4f}"),
            ]
            if workers == 1:  # both run in this process: its CPU time is the whole cost (pools are not counted)
                per_cpu = (mb / lm_cpu, mb / dt_cpu)
                rows.append(("MB of text per CPU-second, 1 worker", f"{mb / lm_cpu:.2f}", f"{mb / dt_cpu:.2f}",
                             f"{dt_cpu / lm_cpu:.2f}x"))
        if args.workers > 1:  # the limit: every worker busy at the in-process rate per CPU-second
            n = args.workers
            rows.append((f"{n} workers' MB/s / ({n} x MB per CPU-second) (limit 1.00)",
                         f"{mb_per_s[n][0] / (n * per_cpu[0]):.2f}", f"{mb_per_s[n][1] / (n * per_cpu[1]):.2f}", "-"))
        rows.append(("corpus", f"{mb:.1f} MB, {sum(1 for f in files for _ in open(f)):,} docs", "same input", "-"))
        print(f"\nvocab {tok.vocab_size}, shuffle on in both\n")
        report(rows, machine, command, f"each of the {args.workers} workers as fast as the in-process run per "
               f"CPU-second ({os.cpu_count()} cores; the fraction reached is a row)", peer="datatrove", numeric=True)


if __name__ == "__main__":
    main()
