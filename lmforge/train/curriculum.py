"""Data curricula: ordered phases, each a token budget with its own mixture, and the lr schedule to match.

    [[data.phases]]                      # general data first
    name = "general"
    tokens = 2_000_000
    sources = [{path = "code", weight = 0.8}, {path = "docs", weight = 0.2}]
    [[data.phases]]                      # then an annealing phase on the best data, lr decaying
    name = "anneal"                      # over exactly this phase (WSD's decay; MiniCPM, Hu et al.
    tokens = 500_000                     # 2024, anneal on high-quality data the same way)
    anneal = true
    sources = [{path = "docs", weight = 1.0, order = "length"}]

`build_data_plan` turns `data.sources` (one mixture over the whole run) or `data.phases` into a resumable
loader, the `TrainConfig` the budgets imply (steps; for an anneal phase, WSD with the decay phase on
it), a start-of-run summary table, and an `on_step_end` hook that logs tokens per source and the phase.
A source used by several phases keeps its position: a later phase continues where the earlier stopped.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lmforge.core.config import option, require
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.data.loader import SequenceLoader
from lmforge.data.mixture import (
    MixtureLoader,
    SourceConfig,
    check_sources,
    format_table,
    plan_sources,
    resolve_source_dir,
)
from lmforge.data.shards import ShardSet
from lmforge.train.schedule import resolve_warmup, wsd_decay_start

if TYPE_CHECKING:
    from lmforge.train.config import StepEnd, TrainConfig


@dataclass
class PhaseConfig:
    name: str = option("", "label in logs and metrics (default: phaseN)")
    tokens: int = option(0, "token budget of the phase (rounded down to whole optimizer steps)")
    sources: list[SourceConfig] = option(default_factory=list, help="the phase's mixture")
    anneal: bool = option(False, "last phase only: the lr decays over exactly this phase (train.schedule "
                                 "becomes wsd with its decay on the phase; set train.min_lr_ratio = 0 to end "
                                 "at zero)")

    def check(self, key: str) -> None:
        require(self.tokens > 0, f"{key}.tokens", self.tokens, "a positive token budget")
        check_sources(self.sources, f"{key}.sources")


# ----------------------------------------------------------------------------------------------
# ordering inside a source


def window_scores(shards: ShardSet, seq_len: int, doc_scores: np.ndarray | None = None) -> np.ndarray:
    """Score of each `SequenceLoader` window: that of the document its first token belongs to.

    `doc_scores` has one entry per document; None scores documents by their length in tokens.
    """
    ends = shards.doc_ends().astype(np.int64)
    if doc_scores is None:
        doc_scores = np.diff(ends, prepend=0)
    n_windows = (shards.n_tokens - 1) // seq_len
    doc = np.searchsorted(ends, np.arange(n_windows, dtype=np.int64) * seq_len, side="right")
    return np.asarray(doc_scores, dtype=np.float64)[doc]


def read_doc_scores(path: str | Path, n_docs: int, key: str) -> np.ndarray:
    """One score per document from a .npy file or a text file with one number a line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: no score file {path}")
    try:
        scores = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, dtype=np.float64, ndmin=1)
    except ValueError as e:
        raise ConfigError(f"{key}: {path}: not one number a line ({str(e).splitlines()[0]})") from None
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size != n_docs:
        raise ConfigError(f"{key}: {path} has {scores.size} scores for the {n_docs} documents of the source")
    return scores


# ----------------------------------------------------------------------------------------------
# the loader


class CurriculumLoader:
    """Phases of `MixtureLoader`s, switched after a fixed number of batches each.

    Phase p serves `batches[p]` micro-batches (its steps * grad_accum); the last phase goes on past its
    budget if asked for more. The switch prints one stderr line naming the first step of the new phase;
    `switches` keeps (step, phase) pairs. Resume: state_dict() = batches served + each phase's state.
    """

    def __init__(self, phases: Sequence[MixtureLoader], names: Sequence[str], batches: Sequence[int],
                 grad_accum: int = 1) -> None:
        if not phases or not len(phases) == len(names) == len(batches) or min(batches) <= 0:
            raise LmforgeError("CurriculumLoader needs a name and a positive batch count per phase")
        self.phases, self.names = list(phases), list(names)
        self.ends = np.cumsum(batches).tolist()
        self.grad_accum = grad_accum
        self.served = 0
        self.phase = 0
        self.switches: list[tuple[int, int]] = []

    def phase_of(self, batch: int) -> int:
        """Phase that serves micro-batch number `batch` (0-based)."""
        return min(int(np.searchsorted(self.ends, batch, side="right")), len(self.phases) - 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.phase_of(self.served)
        if p != self.phase:
            step = self.served // self.grad_accum + 1
            self.switches.append((step, p))
            tokens = sum(self.tokens_by_source().values())
            print(f"curriculum: phase {p + 1}/{len(self.phases)} '{self.names[p]}' starts at step {step} "
                  f"({tokens:,} tokens seen)", file=sys.stderr)
        self.phase = p
        self.served += 1
        return self.phases[p].next_batch()

    def tokens_by_source(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.phases:
            for name, tokens in m.tokens_by_source().items():
                out[name] = out.get(name, 0) + tokens
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"served": self.served, "phases": [m.state_dict() for m in self.phases]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        served, phases = state.get("served"), state.get("phases")
        if not isinstance(served, int) or served < 0 or not isinstance(phases, list) or len(phases) != len(self.phases):
            raise LmforgeError(f"loader state: expected the position of a {len(self.phases)}-phase curriculum, got "
                               f"{state!r:.200} (resuming with different data.phases?)")
        for m, s in zip(self.phases, phases):  # streams shared by phases get the same state twice
            m.load_state_dict(s)
        self.served = served
        self.phase = self.phase_of(served - 1) if served else 0


# ----------------------------------------------------------------------------------------------
# config -> loader, schedule, table, hook


@dataclass
class DataPlan:
    loader: MixtureLoader | CurriculumLoader
    train: TrainConfig  # train.steps (and, with an anneal phase, the schedule) implied by the budgets
    shards: ShardSet  # the first source, for vocabulary checks
    n_tokens: int  # tokens in all sources together
    table: str  # the start-of-run summary
    hook: StepEnd  # logs tokens per source (and the phase) in every metrics row


def build_data_plan(data: Any, train: TrainConfig, *, batch_size: int | None = None, rank: int = 0,
                    world_size: int = 1) -> DataPlan:
    """Loader and schedule for `data.sources` or `data.phases` (a `DataConfig`); errors name the field.

    `batch_size` is this rank's share of the global micro-batch (default data.batch_size, one rank)."""
    if data.sources and data.phases:
        raise ConfigError("data.sources: give either data.sources (one mixture) or data.phases (a curriculum)")
    batch_size = batch_size or data.batch_size
    tokens_per_step = batch_size * data.seq_len * train.grad_accum * world_size
    if data.phases:
        phases = [(p.name or f"phase{i + 1}", p.tokens // tokens_per_step, p.sources, p.anneal, f"data.phases[{i}]")
                  for i, p in enumerate(data.phases)]
        for _, steps, _, _, key in phases:
            if steps == 0:
                raise ConfigError(f"{key}.tokens: fewer than the {tokens_per_step:,} tokens of one optimizer step "
                                  "(data.batch_size * data.seq_len * train.grad_accum)")
        total = sum(p[1] for p in phases)
        if total != train.steps:
            print(f"note: train.steps = {total} from the data.phases token budgets (was {train.steps})",
                  file=sys.stderr)
            train = dataclasses.replace(train, steps=total)
    else:
        phases = [("mixture", train.steps, data.sources, False, "data")]

    shard_sets: dict[Path, ShardSet] = {}
    streams: dict[tuple[Path, str, str], SequenceLoader] = {}
    used: dict[int, int] = {}  # id(stream) -> windows taken by earlier phases
    mixtures, tables, start = [], [], 0
    for p, (name, steps, sources, anneal, key) in enumerate(phases):
        src_key = f"{key}.sources"
        check_sources(sources, src_key)
        if anneal and p != len(phases) - 1:
            raise ConfigError(f"{key}.anneal: only the last phase can anneal (the lr ends with it)")
        phase_streams = []
        for i, src in enumerate(sources):
            directory = resolve_source_dir(src.path, data.path, f"{src_key}[{i}]")
            ident = (directory.resolve(), src.order, src.score_file)
            if ident not in streams:
                shards = shard_sets.setdefault(directory.resolve(), ShardSet(directory))
                scores = None
                if src.order != "shuffle":
                    doc_scores = (read_doc_scores(src.score_file, shards.n_docs, f"{src_key}[{i}].score_file")
                                  if src.order == "score" else None)
                    scores = window_scores(shards, data.seq_len, doc_scores)
                streams[ident] = SequenceLoader(shards, 1, data.seq_len, seed=data.seed + 7919 * len(streams),
                                                order_scores=scores)
            phase_streams.append(streams[ident])
        n_sequences = steps * tokens_per_step // data.seq_len
        plans = plan_sources(sources, phase_streams, n_sequences, src_key,
                             [used.get(id(s), 0) for s in phase_streams])
        for s, plan in zip(phase_streams, plans):
            used[id(s)] = used.get(id(s), 0) + plan.tokens // data.seq_len
        title = (f"data mixture: {n_sequences * data.seq_len:,} tokens over {steps} steps" if not data.phases else
                 f"phase {p + 1}/{len(phases)} '{name}'{' (anneal)' if anneal else ''}: steps {start + 1}-"
                 f"{start + steps}, {n_sequences * data.seq_len:,} tokens")
        tables.append(format_table(plans, title))
        mixtures.append(MixtureLoader(phase_streams, [s.weight for s in sources], [s.name for s in sources],
                                      batch_size, rank=rank, world_size=world_size))
        start += steps

    first = next(iter(shard_sets.values()))
    for shards in shard_sets.values():
        if (shards.vocab_size, shards.tokenizer_sha256) != (first.vocab_size, first.tokenizer_sha256):
            raise ConfigError(f"data.sources: {shards.directory} and {first.directory} were made with different "
                              "tokenizers")
    if phases[-1][3]:
        anneal_steps = phases[-1][1]
        train = dataclasses.replace(train, schedule="wsd", decay_fraction=anneal_steps / train.steps)
        warmup = resolve_warmup(train.warmup_steps, train.steps)
        if wsd_decay_start(warmup, train.steps, train.decay_fraction) != train.steps - anneal_steps:
            raise ConfigError(f"train.warmup_steps: warmup ({warmup} steps) runs into the anneal phase, which "
                              f"starts after step {train.steps - anneal_steps}")
    loader: MixtureLoader | CurriculumLoader = mixtures[0]
    if data.phases:
        loader = CurriculumLoader(mixtures, [p[0] for p in phases], [p[1] * train.grad_accum for p in phases],
                                  train.grad_accum)
    n_tokens = sum(s.n_tokens for s in shard_sets.values())
    return DataPlan(loader, train, first, n_tokens, "\n".join(tables), _metrics_hook(loader))


def _metrics_hook(loader: MixtureLoader | CurriculumLoader) -> StepEnd:
    """Tokens seen per source (and the current phase) as of each metrics row, exactly."""
    def hook(model: nn.Module, step: int) -> dict[str, float]:
        values: dict[str, float] = {f"tokens.{k}": v for k, v in loader.tokens_by_source().items()}
        if isinstance(loader, CurriculumLoader):
            values["phase"] = loader.phase
        return values
    return hook
