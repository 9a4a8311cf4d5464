"""Denoising pretraining objectives: prefix LM, T5 span corruption and UL2's mixture of denoisers.

Every objective turns a window of tokens into a (source, target) pair. An encoder-decoder reads the source
and predicts the target (decoder inputs = target shifted right); a decoder-only model reads source ++ target
as one sequence with the source as its bidirectional prefix and is scored on the target only (the prefix-LM
form UL2 uses for decoders).

Special tokens extend the vocabulary past the tokenizer's (documented, deterministic): with `base` the
shards' vocab size, sentinel i is `base + i` (i < n_sentinels; T5's <extra_id_i>), and the UL2 mode tokens
[R], [S], [X] are `base + n_sentinels + 0, 1, 2`. The model's vocab_size grows to cover the ones its
objective uses: nothing for prefix_lm, the sentinels for span_corruption, sentinels and modes for ul2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lmforge.core.config import option, require
from lmforge.core.errors import ConfigError
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.train.fused_ce import linear_cross_entropy

Objective = Literal["causal", "prefix_lm", "span_corruption", "ul2"]
MODES = ("R", "S", "X")


@dataclass
class DenoiseConfig:
    noise_density: float = option(0.15, "span_corruption: fraction of tokens masked (T5: 0.15)")
    mean_span_length: float = option(3.0, "span_corruption: mean length of a masked span (T5: 3)")
    n_sentinels: int = option(100, "sentinel tokens added past the tokenizer's vocab (T5: 100 extra ids)")

    def check(self) -> None:
        require(0 < self.noise_density < 1, "denoise.noise_density", self.noise_density, "in (0, 1)")
        require(self.mean_span_length >= 1, "denoise.mean_span_length", self.mean_span_length, ">= 1")
        require(self.n_sentinels >= 1, "denoise.n_sentinels", self.n_sentinels, "positive")


@dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser (Tay et al., 2022, sec. 3.1): mode R/X = span corruption with (density, mean span),
    S = sequential prefix LM (density = mean fraction of the window that is target)."""
    mode: str
    noise_density: float
    mean_span_length: float = 0.0


# UL2's seven denoisers (sec. 3.1.2), sampled uniformly per example.
UL2_DENOISERS = (Denoiser("R", 0.15, 3), Denoiser("R", 0.15, 8), Denoiser("S", 0.25),
                 Denoiser("X", 0.5, 3), Denoiser("X", 0.5, 8), Denoiser("X", 0.15, 64), Denoiser("X", 0.5, 64))


def random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of n_items into n_segments non-empty runs (T5's
    `_random_segmentation`: n_segments - 1 distinct cut points among the n_items - 1 gaps)."""
    cuts = np.sort(rng.choice(n_items - 1, n_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def n_noise_spans(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) T5 uses for a length: round(L * density) clamped to [1, L - 1], and
    round(noise / mean span) spans, at least 1."""
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    return n_noise, max(int(round(n_noise / mean_span_length)), 1)


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """T5's `random_spans_noise_mask` (Raffel et al., 2020, sec. 3.1.4): bool [length], True = noise.
    Noise and non-noise run lengths are random segmentations; the mask alternates non-noise, noise, ...,
    so it starts with kept tokens and ends with a noise span."""
    n_noise, n_spans = n_noise_spans(length, noise_density, mean_span_length)
    noise = random_segmentation(n_noise, n_spans, rng)
    keep = random_segmentation(length - n_noise, n_spans, rng)
    runs = np.stack([keep, noise], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], n_spans), runs)


def span_corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets): each noise span in the inputs becomes the next sentinel; the targets list every
    noise span behind its sentinel (T5: "Thank you <X> me to your party <Y> week" -> "<X> for inviting <Y> last")."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each noise span
    if starts.sum() > len(sentinels):
        raise ConfigError(f"span corruption needs {starts.sum()} sentinels, only {len(sentinels)} exist; "
                          "raise denoise.n_sentinels")
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    for token, noise, start in zip(tokens.tolist(), mask.tolist(), starts.tolist()):
        if start:
            span += 1
            inputs.append(sentinels[span])
            targets.append(sentinels[span])
        (targets if noise else inputs).append(token)
    return np.array(inputs, dtype=np.int64), np.array(targets, dtype=np.int64)


def prefix_split(tokens: np.ndarray, rng: np.random.Generator, mean_target: float = 0.5) -> int:
    """A split point p in [1, len - 1]: tokens[:p] is the prefix. The target fraction is uniform on
    (0, 2 * mean_target] (capped at the window), so its mean is `mean_target` for mean_target <= 0.5."""
    L = len(tokens)
    target = int(round(L * rng.uniform(0, min(2 * mean_target, 1.0))))
    return min(max(L - target, 1), L - 1)


class SpecialIds:
    """The sentinel and mode ids past a tokenizer of `base` ids (see the module docstring)."""

    def __init__(self, base: int, n_sentinels: int, modes: bool = True) -> None:
        self.sentinels = list(range(base, base + n_sentinels))
        self.modes = {m: base + n_sentinels + i for i, m in enumerate(MODES)} if modes else {}
        self.vocab_size = base + n_sentinels + len(self.modes)


def make_example(tokens: np.ndarray, denoiser: Denoiser, ids: SpecialIds, rng: np.random.Generator,
                 mode_token: bool) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) of one window for one denoiser; `mode_token` puts UL2's [R]/[S]/[X] first."""
    if denoiser.mode == "S":
        p = prefix_split(tokens, rng, denoiser.noise_density)
        src, tgt = tokens[:p], tokens[p:]
    else:
        mask = random_spans_noise_mask(len(tokens), denoiser.noise_density, denoiser.mean_span_length, rng)
        src, tgt = span_corrupt(tokens, mask, ids.sentinels)
    if mode_token:
        src = np.concatenate([[ids.modes[denoiser.mode]], src])
    return src.astype(np.int64), tgt.astype(np.int64)


def fit_length(denoiser: Denoiser, budget: int, mode_token: bool) -> int:
    """Longest window whose source ++ target fits `budget` tokens (a decoder reads both as one sequence)."""
    extra = int(mode_token)
    if denoiser.mode == "S":
        return budget - extra
    L = budget
    while L > 2 and L + 2 * n_noise_spans(L, denoiser.noise_density, denoiser.mean_span_length)[1] + extra > budget:
        L -= 1
    return L


def collate(pairs: list[tuple[np.ndarray, np.ndarray]], encdec: bool, start_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch of (source, target) pairs. Encoder-decoder: input_ids/src_mask (source, 0-padded),
    decoder_input_ids, targets (IGNORE-padded). Decoder-only: input_ids = (source ++ target)[:-1],
    targets = its next tokens with the source's own predictions ignored, prefix_len = len(source)."""
    B = len(pairs)
    if encdec:
        S, T = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs)
        src, mask = torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)
        tgt = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for i, (s, t) in enumerate(pairs):
            src[i, :len(s)], mask[i, :len(s)], tgt[i, :len(t)] = torch.from_numpy(s), 1, torch.from_numpy(t)
        dec = torch.full_like(tgt, start_id)
        dec[:, 1:] = tgt[:, :-1].masked_fill(tgt[:, :-1] == IGNORE_INDEX, start_id)
        return {"input_ids": src, "src_mask": mask, "decoder_input_ids": dec, "targets": tgt}
    T = max(len(s) + len(t) for s, t in pairs) - 1
    inputs = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    prefix = torch.zeros(B, dtype=torch.long)
    for i, (s, t) in enumerate(pairs):
        seq = torch.from_numpy(np.concatenate([s, t]))
        inputs[i, :len(seq) - 1] = seq[:-1]
        targets[i, len(s) - 1:len(seq) - 1] = seq[len(s):]
        prefix[i] = len(s)
    return {"input_ids": inputs, "targets": targets, "prefix_len": prefix}


class DenoisingBatches:
    """Wraps a (inputs, targets) window loader: each window becomes a denoising example. Resumable: the
    example RNG is seeded by (seed, batch number), and the batch number is saved with the loader's state."""

    def __init__(self, loader: Any, objective: Objective, ids: SpecialIds, cfg: DenoiseConfig, encdec: bool,
                 start_id: int = 0, seed: int = 0) -> None:
        if objective not in ("prefix_lm", "span_corruption", "ul2"):
            raise ConfigError(f"objective '{objective}' is not a denoising objective")
        self.loader, self.objective, self.ids, self.encdec = loader, objective, ids, encdec
        self.start_id, self.seed, self.n = start_id, seed, 0
        self.denoisers = {"prefix_lm": (Denoiser("S", 0.5),),
                          "span_corruption": (Denoiser("R", cfg.noise_density, cfg.mean_span_length),),
                          "ul2": UL2_DENOISERS}[objective]
        self.mode_token = objective == "ul2"

    def next_batch(self) -> dict[str, torch.Tensor]:
        inputs, targets = self.loader.next_batch()
        windows = torch.cat([inputs, targets[:, -1:]], dim=1).numpy()
        rng = np.random.default_rng([self.seed, self.n])
        self.n += 1
        pairs = []
        for row in windows:
            denoiser = self.denoisers[rng.integers(len(self.denoisers))]
            budget = len(row) - 1 if self.encdec else len(row)  # encoder/decoder: <= seq_len each
            L = len(row) if self.objective == "prefix_lm" else fit_length(denoiser, budget, self.mode_token)
            pairs.append(make_example(row[:L], denoiser, self.ids, rng, self.mode_token))
        return collate(pairs, self.encdec, self.start_id)

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "batches": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state.get("loader", {}))
        self.n = int(state.get("batches", 0))


def denoise_loss(model: nn.Module, batch: dict[str, torch.Tensor], aux: Callable | None = None
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Cross-entropy on the target tokens only (fused with the LM head): an encoder-decoder reads the source
    and teacher-forces the target; a decoder reads the sequence with the source as its bidirectional prefix.
    `aux(model, loss, hidden, targets)` adds the model's auxiliary losses (pretrain's `with_aux_losses`)."""
    if "decoder_input_ids" in batch:
        hidden = model(batch["input_ids"], batch["decoder_input_ids"], batch["src_mask"], return_hidden=True)
    else:
        hidden = model(batch["input_ids"], prefix_len=batch["prefix_len"], return_hidden=True)
    loss = linear_cross_entropy(hidden, model.lm_head.weight, batch["targets"])
    return aux(model, loss, hidden, batch["targets"]) if aux is not None else (loss, {})
