"""`lmforge data tokenize`: documents -> token shards (train + val), each document followed by eos.

The output directory is self-describing: `train/` and `val/` shard sets (lmforge.data.shards) and
a copy of the tokenizer, whose sha256 every shard index records.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from lmforge.config import option
from lmforge.data.readers import Document, read_documents
from lmforge.data.shards import ShardWriter
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

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


def is_val_doc(index: int, seed: int, val_fraction: float) -> bool:
    """A document's split depends only on (seed, its index among non-empty documents): reruns agree."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def tokenize_to_shards(paths: Sequence[str | Path], tokenizer: Tokenizer, output: str | Path,
                       text_field: str = "text", val_fraction: float = 0.005, seed: int = 0,
                       batch_docs: int = 256, max_shard_tokens: int = 100_000_000) -> dict[str, Any]:
    """Encode every non-empty document (+ eos) into OUTPUT/train and OUTPUT/val shard sets.

    With val_fraction > 0 and at least two documents, val is never empty: the last document bound
    for train is held back one step and goes to val if no other document did.
    Returns {"train": index, "val": index | None, "seconds": float}.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LmforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if batch_docs < 1:
        raise LmforgeError(f"batch_docs must be >= 1, got {batch_docs}")
    if max_shard_tokens < 1:
        raise LmforgeError(f"max_shard_tokens must be >= 1, got {max_shard_tokens}")
    eos_id = tokenizer.eos_id
    if eos_id is None:
        raise LmforgeError("the tokenizer has no eos token; documents in shards must end with one")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    output = Path(output)
    start = time.perf_counter()

    sha256 = tokenizer.sha256
    splits = ["train", "val"] if val_fraction > 0 else ["train"]
    if "val" not in splits and (output / "val").is_dir():  # a stale val set from an earlier run would
        ShardWriter(output / "val", tokenizer.vocab_size).abort()  # be mistaken for this one's: clear it
    writers = {split: ShardWriter(output / split, tokenizer.vocab_size, sha256, eos_id, max_shard_tokens)
               for split in splits}
    n_docs = dict.fromkeys(splits, 0)

    def add(split: str, ids: list[int], n_bytes: int) -> None:
        writers[split].add(ids, n_bytes=n_bytes)
        n_docs[split] += 1

    with contextlib.ExitStack() as stack:  # an error aborts every writer: no index, no readable set
        for w in writers.values():
            stack.enter_context(w)
        held: tuple[list[int], int] | None = None  # the latest train-bound document, not yet written
        n_bytes_total = 0
        bar = stack.enter_context(tqdm(desc="tokenize", unit="doc", dynamic_ncols=True))
        for index, doc, ids in _encoded_docs(read_documents(paths, text_field=text_field), tokenizer,
                                             batch_docs):
            n_bytes = len(doc.text.encode("utf-8"))
            if "val" in writers and is_val_doc(index, seed, val_fraction):
                add("val", ids, n_bytes)
            else:
                if held is not None:
                    add("train", *held)
                held = (ids, n_bytes)
            n_bytes_total += n_bytes
            bar.update(1)
            if bar.n % batch_docs == 0:
                bar.set_postfix_str(f"{n_bytes_total / 1e6 / (time.perf_counter() - start):.1f} MB/s")
        if held is not None:
            to_val = "val" in writers and n_docs["val"] == 0 and n_docs["train"] > 0
            add("val" if to_val else "train", *held)
        if n_docs["train"] == 0:
            what = "every document went to validation" if n_docs.get("val") else "no non-empty documents"
            raise LmforgeError(f"nothing to tokenize: {what} in {', '.join(map(str, paths))}")
        indexes = {split: w.close() for split, w in writers.items()}
    tokenizer.save(output)
    return {"train": indexes["train"], "val": indexes.get("val"), "seconds": time.perf_counter() - start}


def _encoded_docs(docs: Iterable[Document], tokenizer: Tokenizer,
                  batch_docs: int) -> Iterator[tuple[int, Document, list[int]]]:
    """(index, document, ids + eos) for each non-empty document, encoded `batch_docs` at a time."""
    index = 0
    for batch in batched((d for d in docs if d.text), batch_docs):
        for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch], add_eos=True)):
            yield index, doc, ids
            index += 1


def tokenize_cmd(cfg: TokenizeConfig) -> int:
    if not cfg.input:
        raise LmforgeError("data tokenize: no input; pass --input FILE_OR_DIR [...]")
    tokenizer = Tokenizer.load(cfg.tokenizer)
    result = tokenize_to_shards(cfg.input, tokenizer, cfg.output, text_field=cfg.text_field,
                                val_fraction=cfg.val_fraction, seed=cfg.seed, batch_docs=cfg.batch_docs,
                                max_shard_tokens=cfg.max_shard_tokens)
    for split in ("train", "val"):
        index = result[split]
        if index is not None:
            bytes_per_token = index["n_bytes"] / max(index["n_tokens"], 1)
            print(f"{split}: {index['n_docs']} documents, {index['n_tokens']:,} tokens, "
                  f"{bytes_per_token:.2f} bytes/token -> {Path(cfg.output) / split}")
    total_bytes = result["train"]["n_bytes"] + (result["val"] or {}).get("n_bytes", 0)
    print(f"tokenized {total_bytes / 1e6:.1f} MB in {result['seconds']:.1f} s "
          f"({total_bytes / 1e6 / max(result['seconds'], 1e-9):.1f} MB/s); tokenizer copied to {cfg.output}")
    return 0
