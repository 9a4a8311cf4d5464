"""`lmforge data tokenize`: documents -> token shards (train + val), each document followed by eos (and preceded
by the tokenizer's declared start token, e.g. Llama's bos: the sequence-start rule in `lmforge.tokenizer.chat`).

The output directory is self-describing: `train/` and `val/` shard sets (lmforge.data.shards) and
a copy of the tokenizer, whose sha256 every shard index records. Encoding and shard writing run in
`workers` processes; documents can be shuffled across shards (seeded); the bytes written depend on
neither the worker count nor timing. `--megatron PREFIX` also exports Megatron-LM .bin/.idx files.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError, os_errors
from lmforge.core.files import dir_lock
from lmforge.data.corpus import split_by_source
from lmforge.data.megatron import export_megatron
from lmforge.data.mixture import concat_shards
from lmforge.data.readers import Document, read_documents
from lmforge.data.shards import ShardSet, clear_shard_dir, shard_layout, token_dtype, write_index, write_shard
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.fast import TextEncoder

T = TypeVar("T")


@dataclass
class TokenizeConfig:
    input: list[str] = option(default_factory=list, help="text/JSONL files or directories to tokenize")
    tokenizer: str = option("tokenizer", help="tokenizer.json, or a directory holding one")
    output: str = option("shards", help="directory for train/ and val/ shard sets")
    text_field: str = option("text", help="JSONL field holding the text")
    val_fraction: float = option(0.005, help="fraction of documents held out for validation")
    seed: int = option(0, help="seed of the train/val assignment")
    batch_docs: int = option(256, help="documents encoded per batch")
    max_shard_tokens: int = option(100_000_000, help="tokens per shard file")
    workers: int = option(1, help="processes that encode and write shards (the output is identical for any number)")
    shuffle: bool = option(False, help="shuffle documents across the shards of each split (deterministic: --seed)")
    megatron: str = option("", help="also export each split as a Megatron-LM indexed dataset "
                           "PREFIX_train.bin/.idx (and PREFIX_val.bin/.idx)")


def is_val_doc(index: int, seed: int, val_fraction: float) -> bool:
    """A document's split depends only on (seed, its index among non-empty documents): reruns agree."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


BATCH_CHARS = 1 << 20  # a batch also closes at ~1M characters, so long documents still spread over the workers


def text_batches(texts: Iterable[str], max_docs: int, max_chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    """Consecutive texts grouped until `max_docs` texts or `max_chars` characters (a function of the input
    only, so batching never changes the output)."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_to_shards(paths: Sequence[str | Path], tokenizer: Tokenizer, output: str | Path,
                       text_field: str = "text", val_fraction: float = 0.005, seed: int = 0,
                       batch_docs: int = 256, max_shard_tokens: int = 100_000_000, workers: int = 1,
                       shuffle: bool = False) -> dict[str, Any]:
    """Encode every non-empty document (+ eos) into OUTPUT/train and OUTPUT/val shard sets.

    Two passes. (1) Documents are read in order and encoded in batches (`batch_docs` documents or ~1M
    characters) by `workers` processes into a spill file. (2) Each split's document order is fixed (file
    order, or a permutation seeded by `seed` when `shuffle`), and the shards, whose contents that order
    determines, are written by the workers. Nothing depends on the worker count, so the output is
    byte-identical for any `workers`.
    With val_fraction > 0 and at least two documents, val is never empty: the last train document goes
    to val if no other document did. Returns {"train": index, "val": index | None, "seconds": float}.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LmforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for name, value in [("batch_docs", batch_docs), ("max_shard_tokens", max_shard_tokens), ("workers", workers)]:
        if value < 1:
            raise LmforgeError(f"{name} must be >= 1, got {value}")
    eos_id = tokenizer.eos_id
    if eos_id is None:
        raise LmforgeError("the tokenizer has no eos token; documents in shards must end with one")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    output = Path(output)
    start = time.perf_counter()
    splits = ["train", "val"] if val_fraction > 0 else ["train"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(dir_lock(output))  # one owner: a second `data tokenize` here is refused
        for split in ("train", "val"):  # no index survives from an earlier run, whatever happens to this one
            if split in splits or (output / split).is_dir():
                clear_shard_dir(output / split)
        dtype = token_dtype(tokenizer.vocab_size)
        spill = output / f".tokenize-spill-{os.getpid()}.bin"
        stack.callback(spill.unlink, missing_ok=True)
        run = stack.enter_context(_Workers(workers, tokenizer.canonical_json(), document_start(tokenizer), eos_id,
                                           dtype))
        lengths, n_bytes = _encode_to_spill(read_documents(paths, text_field=text_field), run, spill, batch_docs)
        is_val = np.array([is_val_doc(i, seed, val_fraction) for i in range(len(lengths))], dtype=bool)
        if "val" in splits and not is_val.any() and len(lengths) >= 2:
            is_val[-1] = True
        if is_val.all():
            what = "every document went to validation" if len(lengths) else "no non-empty documents"
            raise LmforgeError(f"nothing to tokenize: {what} in {', '.join(map(str, paths))}")
        starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]])
        tokens = np.memmap(spill, dtype=dtype, mode="r")
        indexes = {}
        for split_id, split in enumerate(splits):
            order = np.flatnonzero(is_val if split == "val" else ~is_val)
            if shuffle:  # a permutation of the split's documents that depends only on (seed, split)
                order = order[np.random.default_rng([seed, split_id]).permutation(len(order))]
            indexes[split] = _write_split(output / split, run, tokens, starts[order], lengths[order],
                                          n_bytes[order], tokenizer, max_shard_tokens)
        del tokens
        tokenizer.save(output)
    return {"train": indexes["train"], "val": indexes.get("val"), "seconds": time.perf_counter() - start}


def tokenize_by_source(corpus: str | Path, tokenizer: Tokenizer, output: str | Path,
                       val_fraction: float = 0.005) -> dict[str, Any]:
    """One shard set per corpus source, OUTPUT/<source>/{train,val} (what a mixture samples from), and their
    union OUTPUT/{train,val} (what evaluation reads); each document is in exactly one split.

    Returns {"train_tokens", "val_tokens", "train_docs", "sources": {source: {"train_tokens", "train_docs"}}}.
    """
    output = Path(output)
    parts = split_by_source(corpus, output / "by_source")
    sources = {}
    for name, path in parts.items():
        summary = tokenize_to_shards([path], tokenizer, output / name, val_fraction=val_fraction)
        sources[name] = {"train_tokens": summary["train"]["n_tokens"], "train_docs": summary["train"]["n_docs"]}
    shutil.rmtree(output / "by_source")
    train = concat_shards([output / name / "train" for name in parts], output / "train")
    val_dirs = [output / name / "val" for name in parts if (output / name / "val" / "index.json").is_file()]
    val = concat_shards(val_dirs, output / "val") if val_dirs else {}
    tokenizer.save(output)
    return {"train_tokens": train["n_tokens"], "val_tokens": val.get("n_tokens", 0), "train_docs": train["n_docs"],
            "sources": sources}


def _encode_to_spill(docs: Iterable[Document], run: _Workers, spill: Path,
                     batch_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode non-empty documents in order into `spill`; returns their token counts and UTF-8 byte counts."""
    lengths: list[np.ndarray] = []
    n_bytes: list[np.ndarray] = []
    batches = text_batches((d.text for d in docs if d.text), batch_docs)
    with open(spill, "wb") as f, tqdm(desc="tokenize", unit="B", unit_scale=True, dynamic_ncols=True) as bar:
        for ids, doc_lengths, doc_bytes in run.map(_encode_batch, batches):
            f.write(ids.tobytes())
            lengths.append(doc_lengths)
            n_bytes.append(doc_bytes)
            bar.update(int(doc_bytes.sum()))
    empty = np.empty(0, np.int64)
    return np.concatenate([empty, *lengths]), np.concatenate([empty, *n_bytes])


def _write_split(directory: Path, run: _Workers, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                 n_bytes: np.ndarray, tokenizer: Tokenizer, max_shard_tokens: int) -> dict[str, Any]:
    """Write the documents (spill offsets `starts`, `lengths`) in this order as a shard set, one task per shard."""
    jobs = []
    stream_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # of each document, and the end
    for shard, (first, stop, ending) in enumerate(shard_layout(lengths, max_shard_tokens)):
        lo = shard * max_shard_tokens  # stream offset where the shard begins
        doc_starts = stream_starts[first:stop + 1]
        # (spill start, length) of each piece: documents clipped to the shard's token range
        a = np.maximum(doc_starts[:-1], lo)
        b = np.minimum(doc_starts[1:], lo + max_shard_tokens)
        pieces = np.stack([starts[first:stop] + (a - doc_starts[:-1]), b - a], axis=1)
        doc_ends = doc_starts[1:ending - first + 1] - lo
        jobs.append((str(directory), shard, str(tokens.filename), tokens.dtype.str, pieces, doc_ends,
                     int(n_bytes[first:ending].sum())))
    shards = list(run.map(_write_shard_job, jobs))
    return write_index(directory, tokenizer.vocab_size, tokenizer.sha256, tokenizer.eos_id, shards)


# -- worker processes ----------------------------------------------------------------------------------------

_worker_state: dict[str, Any] = {}


def document_start(tokenizer: Tokenizer) -> list[int]:
    """Ids put before each document: those the tokenizer's post-processor declares (Llama's bos), except a lone
    eos, which the previous document's end already is (the rule in `lmforge.tokenizer.chat`)."""
    start = tokenizer.declared_start
    return [] if start == [tokenizer.eos_id] else start


def _init_worker(tokenizer_json: str, start: list[int], eos_id: int, dtype: str, in_pool: bool = True) -> None:
    # one process per core in a pool: one text at a time inside each (no Rust threads for the HF fallback);
    # in this process: all cores
    if in_pool:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state.update(encoder=TextEncoder(tokenizer_json, threads=1 if in_pool else None),
                         start=np.asarray(start, np.int64), eos=np.asarray([eos_id], np.int64),
                         dtype=np.dtype(dtype))


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids of all texts, each as start + text + eos, as one array; tokens per text; UTF-8 bytes per text).

    Texts are plain characters: a special token's text in a document is never read as that token."""
    start, eos = _worker_state["start"], _worker_state["eos"]
    pieces: list[np.ndarray] = []
    for ids in _worker_state["encoder"].encode_batch(texts):
        pieces += [start, ids, eos]
    lengths = np.fromiter((len(ids) for ids in pieces[1::3]), np.int64, len(texts)) + len(start) + 1
    n_bytes = np.fromiter((len(t.encode("utf-8")) for t in texts), np.int64, len(texts))
    return np.concatenate(pieces).astype(_worker_state["dtype"]), lengths, n_bytes


def _write_shard_job(job: tuple[str, int, str, str, np.ndarray, np.ndarray, int]) -> dict[str, Any]:
    directory, shard, spill, dtype, pieces, doc_ends, n_bytes = job
    tokens = np.memmap(spill, dtype=np.dtype(dtype), mode="r")
    return write_shard(Path(directory), shard, tokens.dtype, [tokens[s:s + n] for s, n in pieces.tolist()],
                       doc_ends, n_bytes)


class _Workers:
    """`map` in order over a pool of `n` processes, or in this process when n == 1 (same functions, same
    results). At most 2n tasks are in flight, so reading never runs far ahead of encoding."""

    def __init__(self, n: int, tokenizer_json: str, start: list[int], eos_id: int, dtype: np.dtype) -> None:
        self.n = n
        self._init = (tokenizer_json, start, eos_id, dtype.str)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> _Workers:
        if self.n == 1:
            _init_worker(*self._init, in_pool=False)
        else:
            # fork where there is one: workers start in milliseconds and a caller's script needs no
            # `if __name__ == "__main__"` guard (spawn re-imports it); workers rebuild the encoder from JSON
            # and run it single-threaded, so no thread pool state crosses the fork
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.n, mp_context=multiprocessing.get_context(method), initializer=_init_worker,
                initargs=self._init)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        _worker_state.clear()

    def map(self, fn: Callable[..., T], items: Iterable[Any]) -> Iterator[T]:
        if self._pool is None:
            yield from map(fn, items)
            return
        pending: collections.deque[concurrent.futures.Future[T]] = collections.deque()
        try:
            for item in items:
                pending.append(self._pool.submit(fn, item))
                if len(pending) >= 2 * self.n:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except concurrent.futures.process.BrokenProcessPool:
            raise LmforgeError("a tokenize worker process died (killed, or out of memory?); "
                               "try fewer --workers or a smaller --batch_docs") from None


def tokenize_cmd(cfg: TokenizeConfig) -> int:
    if not cfg.input:
        raise LmforgeError("data tokenize: no input; pass --input FILE_OR_DIR [...]")
    tokenizer = Tokenizer.load(cfg.tokenizer)
    with os_errors():
        result = tokenize_to_shards(cfg.input, tokenizer, cfg.output, text_field=cfg.text_field,
                                    val_fraction=cfg.val_fraction, seed=cfg.seed, batch_docs=cfg.batch_docs,
                                    max_shard_tokens=cfg.max_shard_tokens, workers=cfg.workers,
                                    shuffle=cfg.shuffle)
    for split in ("train", "val"):
        index = result[split]
        if index is not None:
            bytes_per_token = index["n_bytes"] / max(index["n_tokens"], 1)
            print(f"{split}: {index['n_docs']} documents, {index['n_tokens']:,} tokens, "
                  f"{bytes_per_token:.2f} bytes/token -> {Path(cfg.output) / split}")
    total_bytes = result["train"]["n_bytes"] + (result["val"] or {}).get("n_bytes", 0)
    print(f"tokenized {total_bytes / 1e6:.1f} MB in {result['seconds']:.1f} s "
          f"({total_bytes / 1e6 / max(result['seconds'], 1e-9):.1f} MB/s); tokenizer copied to {cfg.output}")
    if cfg.megatron:
        for split in ("train", "val"):
            if result[split] is not None:
                bin_path, idx_path = export_megatron(ShardSet(Path(cfg.output) / split), f"{cfg.megatron}_{split}")
                print(f"megatron: {bin_path}, {idx_path}")
    return 0
