"""Export a shard set as a Megatron-LM indexed dataset (`MMapIndexedDataset`: PREFIX.bin + PREFIX.idx).

Megatron-LM, NeMo and GPT-NeoX train from this pair, so lmforge shards can feed them unchanged.
One document is one sequence. Layout of PREFIX.idx (little-endian), as Megatron's `_IndexWriter`:

    b"MMIDIDX\\x00\\x00"             9-byte magic
    uint64 version = 1
    uint8  dtype code              8 = uint16 (vocab <= 65536), 4 = int32 (larger vocabularies)
    uint64 sequence count N
    uint64 document-index count    N + 1
    int32[N]  sequence lengths     tokens per sequence
    int64[N]  sequence pointers    byte offset of each sequence in PREFIX.bin
    int64[N+1] document indices    0, 1, ..., N (each document is a single sequence)

PREFIX.bin is the token ids of every sequence back to back in that dtype.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write
from lmforge.data.shards import ShardSet

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {np.dtype("<u2"): 8, np.dtype("<i4"): 4}
_CHUNK = 1 << 22  # tokens copied per step


@dataclass
class ExportMegatronConfig:
    shards: str = option("shards/train", help="shard set directory (holding index.json)")
    output: str = option("megatron/data", help="output prefix: writes PREFIX.bin and PREFIX.idx")


def megatron_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 while ids fit, else int32 (it has no uint32)."""
    if vocab_size > 1 << 31:
        raise LmforgeError(f"vocab_size {vocab_size} does not fit Megatron's int32 token ids")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def export_megatron(shards: ShardSet, prefix: str | Path) -> tuple[Path, Path]:
    """Write PREFIX.bin and PREFIX.idx holding every document of `shards`; returns the two paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = megatron_dtype(shards.vocab_size)
    ends = shards.doc_ends().astype(np.int64)
    lengths = np.diff(ends, prepend=0)
    if lengths.size and lengths.max() >= 1 << 31:
        raise LmforgeError(f"{shards.directory}: a document of {lengths.max()} tokens exceeds Megatron's int32 "
                           "sequence length")
    bin_path, idx_path = prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")

    def write_bin(tmp: str) -> None:
        with open(tmp, "wb") as f, tqdm(total=shards.n_tokens, desc="megatron .bin", unit="tok",
                                        unit_scale=True, dynamic_ncols=True) as bar:
            for start in range(0, shards.n_tokens, _CHUNK):
                chunk = shards.read(start, min(_CHUNK, shards.n_tokens - start))
                f.write(chunk.astype(dtype).tobytes())
                bar.update(len(chunk))

    def write_idx(tmp: str) -> None:
        pointers = (ends - lengths) * dtype.itemsize
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(lengths) + 1))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(np.arange(len(lengths) + 1, dtype="<i8").tobytes())

    atomic_write(bin_path, write_bin)
    atomic_write(idx_path, write_idx)
    return bin_path, idx_path


def export_megatron_cmd(cfg: ExportMegatronConfig) -> int:
    shards = ShardSet(cfg.shards)
    bin_path, idx_path = export_megatron(shards, cfg.output)
    print(f"{shards.n_docs} documents, {shards.n_tokens:,} tokens -> {bin_path} "
          f"({os.path.getsize(bin_path) / 1e6:.1f} MB), {idx_path}")
    return 0
