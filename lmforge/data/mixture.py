"""Data mixtures: several shard sets, each with a target share of the training tokens.

`data.sources = [{path = "code", weight = 0.7}, {path = "docs", weight = 0.3, max_epochs = 4}]`
makes a `MixtureLoader` that draws every sequence from one source. Which source is decided by a
deterministic deficit schedule (below), not by iid sampling, so the token shares equal the weights
to within one sequence per source at every point of the run, not only in expectation. Inside a source,
sequences come from a `SequenceLoader` (shuffled windows, epochs roll over).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmforge.core.config import option, require
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.data.loader import SequenceLoader, to_batch
from lmforge.data.shards import INDEX_NAME, ShardSet, ShardWriter

Order = Literal["shuffle", "length", "score"]


@dataclass
class SourceConfig:
    path: str = option("", "shard directory of this source (a relative path is taken inside data.path; "
                           "DIR/train is used when it holds the shards)")
    weight: float = option(1.0, "target share of the tokens (weights are normalized to sum to 1)")
    name: str = option("", "label in the summary table and metrics (default: the directory name)")
    max_epochs: float = option(0.0, "most passes over this source the token budget may take; 0 = no limit")
    order: Order = option("shuffle", "order of sequences inside the source: shuffle, or ascending by the "
                                     "length of their document (length) or by a per-document score (score)")
    score_file: str = option("", "order=score: one number per document, in shard order (.npy, or text with "
                                 "one number a line)")

    def __post_init__(self) -> None:
        self.name = self.name or Path(self.path).name

    def check(self, key: str) -> None:
        """Validate; `key` (e.g. data.sources[2]) prefixes the field named in the error."""
        require(bool(self.path), f"{key}.path", self.path, "the path of the source's shard directory")
        require(self.weight > 0 and math.isfinite(self.weight), f"{key}.weight", self.weight, "a positive number")
        require(self.max_epochs >= 0, f"{key}.max_epochs", self.max_epochs, ">= 0 (0 = no limit)")
        require((self.order == "score") == bool(self.score_file), f"{key}.score_file", self.score_file,
                f"given exactly when order = 'score' (order is {self.order!r})")


def check_sources(sources: Sequence[SourceConfig], key: str) -> None:
    """Each source valid and names unique (they label the metrics); errors name `key[i].field`."""
    require(bool(sources), key, list(sources), "a mixture of at least one source")
    seen: dict[str, int] = {}
    for i, src in enumerate(sources):
        src.check(f"{key}[{i}]")
        require(src.name not in seen, f"{key}[{i}].name", src.name,
                f"distinct from the name of {key}[{seen.get(src.name)}] (names label the metrics)")
        seen[src.name] = i


def resolve_source_dir(path: str, data_dir: str | Path, key: str) -> Path:
    """`path` (relative ones inside `data_dir`), or its train/ subdirectory when that holds the shards."""
    root = Path(path) if Path(path).is_absolute() or not str(data_dir) else Path(data_dir) / path
    for candidate in (root / "train", root):
        if (candidate / INDEX_NAME).is_file():
            return candidate
    raise ConfigError(f"{key}.path: no token shards in {root} (expected {INDEX_NAME} or train/{INDEX_NAME})")


# ----------------------------------------------------------------------------------------------
# the schedule


class DeficitSchedule:
    """Deterministic weighted interleaving: draw k goes to the source furthest behind its quota.

    After n draws source i has c_i; draw n+1 goes to argmax_i (w_i * (n + 1) - c_i), the lowest index
    on ties. This is smooth weighted round-robin (nginx's upstream balancer; stride scheduling,
    Waldspurger & Weihl 1995) written as a deficit: every prefix of the stream is a near-exact
    apportionment, |c_i - w_i * n| < 1 for every source and every n (tested), so the token shares
    hit the weights over any budget, and the whole state is the count vector.
    """

    def __init__(self, weights: Sequence[float]) -> None:
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.counts = [0] * len(weights)

    def take(self, n: int) -> np.ndarray:
        """Source index of each of the next `n` draws."""
        out = np.empty(n, dtype=np.int64)
        weights, counts = self.weights, self.counts
        drawn = sum(counts)
        for k in range(n):
            drawn += 1
            best, best_deficit = 0, -math.inf
            for i, w in enumerate(weights):
                deficit = w * drawn - counts[i]
                if deficit > best_deficit:
                    best, best_deficit = i, deficit
            counts[best] += 1
            out[k] = best
        return out


# ----------------------------------------------------------------------------------------------
# the loader


class MixtureLoader:
    """Batches whose sequences come from several `SequenceLoader` streams in `DeficitSchedule` proportions.

    Streams must share seq_len; each serves whole windows, so token shares equal sequence shares.
    Under data parallelism every rank draws the same global batch of batch_size * world_size and
    keeps its slice (as `SequenceLoader` does), so the per-source counts are global and identical
    on every rank. Exact resume: state_dict() holds the schedule's counts and every stream's position.
    """

    def __init__(self, streams: Sequence[SequenceLoader], weights: Sequence[float], names: Sequence[str],
                 batch_size: int, *, rank: int = 0, world_size: int = 1) -> None:
        if not streams or len(streams) != len(weights) or len(streams) != len(names):
            raise LmforgeError("MixtureLoader needs one weight and one name per stream")
        if len({s.seq_len for s in streams}) != 1:
            raise LmforgeError("every stream of a mixture must have the same seq_len")
        if batch_size <= 0 or not 0 <= rank < world_size:
            raise LmforgeError(f"bad batch_size {batch_size} / rank {rank} / world_size {world_size}")
        self.streams = list(streams)
        self.names = list(names)
        self.schedule = DeficitSchedule(weights)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seq_len = streams[0].seq_len

    def next_rows(self) -> np.ndarray:
        """This rank's [batch_size, seq_len + 1] token rows of the next global batch."""
        picks = self.schedule.take(self.batch_size * self.world_size)
        windows = np.empty_like(picks)
        for i in np.unique(picks):
            at = picks == i
            windows[at] = self.streams[i].next_windows(int(at.sum()))  # every rank advances every stream
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for j, (i, w) in enumerate(zip(picks[lo:hi], windows[lo:hi])):
            rows[j] = self.streams[i].shards.read(int(w) * self.seq_len, self.seq_len + 1)
        return rows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return to_batch(self.next_rows())

    def tokens_by_source(self) -> dict[str, int]:
        """Target tokens served so far from each source (all ranks together)."""
        return {name: count * self.seq_len for name, count in zip(self.names, self.schedule.counts)}

    def state_dict(self) -> dict[str, Any]:
        return {"counts": list(self.schedule.counts), "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts, streams = state.get("counts"), state.get("streams")
        if (not isinstance(counts, list) or len(counts) != len(self.streams) or not isinstance(streams, list)
                or len(streams) != len(self.streams)
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
            raise LmforgeError(f"loader state: expected counts and positions of {len(self.streams)} sources, got "
                               f"{state!r:.200} (resuming with a different data.sources?)")
        for stream, s in zip(self.streams, streams):
            stream.load_state_dict(s)
        self.schedule.counts = list(counts)


# ----------------------------------------------------------------------------------------------
# plans: what a budget takes from each source, checked before training starts


@dataclass
class SourcePlan:
    name: str
    directory: Path
    tokens_available: int  # target tokens in one epoch of windows
    weight: float  # normalized
    tokens: int  # budgeted target tokens from this source
    max_epochs: float
    tokens_before: int = 0  # taken from the same stream by earlier curriculum phases

    @property
    def epochs(self) -> float:
        return self.tokens / self.tokens_available


def plan_sources(sources: Sequence[SourceConfig], streams: Sequence[SequenceLoader], n_sequences: int,
                 key: str, used_before: Sequence[int] | None = None) -> list[SourcePlan]:
    """Tokens each source gives to a budget of `n_sequences` (global) sequences; raises `ConfigError`
    naming `key[i].max_epochs` when a source would be repeated more often than allowed.

    `used_before` are windows already taken from each stream (earlier curriculum phases share streams).
    """
    total = sum(s.weight for s in sources)
    plans = []
    for i, (src, stream) in enumerate(zip(sources, streams)):
        weight = src.weight / total
        # the schedule keeps every count below w * n + 1, so this is the most it can take
        needed = min(n_sequences, math.floor(weight * n_sequences + 1 - 1e-9))
        seq_len = stream.seq_len
        before = used_before[i] if used_before else 0
        plan = SourcePlan(src.name, stream.shards.directory, stream.n_windows * seq_len, weight,
                          needed * seq_len, src.max_epochs, before * seq_len)
        taken = needed + before
        if src.max_epochs and taken > src.max_epochs * stream.n_windows:
            raise ConfigError(
                f"{key}[{i}].max_epochs: source {src.name!r} ({plan.directory}) would be read "
                f"{taken / stream.n_windows:.2f} times ({taken:,} sequences of its {stream.n_windows:,}), "
                f"above max_epochs {src.max_epochs:g}; lower its weight or the token budget, or add data")
        plans.append(plan)
    return plans


def format_table(plans: Sequence[SourcePlan], title: str) -> str:
    """The start-of-run summary: source, tokens available, weight, tokens budgeted, epochs implied (and, for
    a source earlier curriculum phases read too, the epochs over the run so far)."""
    header = ("source", "tokens available", "weight", "tokens", "epochs", "max epochs")
    rows = [(p.name, f"{p.tokens_available:,}", f"{p.weight:.3f}", f"{p.tokens:,}",
             f"{p.epochs:.2f}" + (f" ({(p.tokens + p.tokens_before) / p.tokens_available:.2f} in all)"
                                  if p.tokens_before else ""),
             f"{p.max_epochs:g}" if p.max_epochs else "-") for p in plans]
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    lines = [title, "  " + "  ".join(h.ljust(w) if c == 0 else h.rjust(w) for c, (h, w) in
                                    enumerate(zip(header, widths)))]
    lines += ["  " + "  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))
              for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# helpers


def concat_shards(inputs: Sequence[str | Path], output: str | Path) -> dict[str, Any]:
    """Write the documents of several shard sets (same tokenizer) one after another into `output`."""
    sets = [ShardSet(p) for p in inputs]
    if not sets:
        raise LmforgeError("concat_shards: no inputs")
    first = sets[0]
    for s in sets[1:]:
        if (s.vocab_size, s.tokenizer_sha256, s.eos_id) != (first.vocab_size, first.tokenizer_sha256, first.eos_id):
            raise LmforgeError(f"{s.directory}: made with another tokenizer than {first.directory}")
    with ShardWriter(output, first.vocab_size, first.tokenizer_sha256, first.eos_id) as writer:
        for s in sets:
            ends = s.doc_ends().astype(np.int64)
            starts = np.concatenate([[0], ends[:-1]])
            byte_shares = _bytes_per_doc(s, ends - starts)
            for start, end, n_bytes in zip(starts, ends, byte_shares):
                writer.add(s.read(int(start), int(end - start)), n_bytes=int(n_bytes))
        return writer.close()


def _bytes_per_doc(s: ShardSet, lengths: np.ndarray) -> np.ndarray:
    """Per-document byte counts (the index keeps bytes per shard, not per document): the set's bytes
    spread over its documents by token count, so the total, which bits-per-byte needs, is exact."""
    if not s.n_bytes or not len(lengths):
        return np.zeros(len(lengths), dtype=np.int64)
    shares = np.floor(lengths * (s.n_bytes / max(1, int(lengths.sum())))).astype(np.int64)
    shares[-1] += s.n_bytes - int(shares.sum())
    return shares
