"""Preference pairs for the reward model and DPO: synthetic ones from the task suite, tokenization, batches.

Synthetic pairs put the exact answer (chosen) against a near miss (rejected): a number off by a little,
one list item or letter changed, two items swapped. A near miss keeps the format, so a model can only
prefer the chosen answer by checking it against the prompt, which is what the reward model should learn.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.core.config import option, require
from lmforge.core.errors import LmforgeError
from lmforge.data.formats import PreferencePair, read_preference_pairs
from lmforge.posttrain.models import device_of
from lmforge.posttrain.stage import StageConfig
from lmforge.tasks.suite import TASK_KINDS, TaskExample, make_examples
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import Encoded, encode_prompt_response, pad_batch


def near_miss(answer: str, rng: random.Random) -> str:
    """A wrong answer that looks like a right one (never equal to `answer`)."""
    items = answer.split(" ")
    for _ in range(20):
        out = list(items)
        if len(out) == 1 and out[0].isdigit():
            out[0] = str(max(0, int(out[0]) + rng.choice([-2, -1, 1, 2])))
        elif len(out) > 1 and rng.random() < 0.5:
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
        else:
            i = rng.randrange(len(out))
            pool = "0123456789" if out[i].isdigit() else "abcdefghijklmnopqrstuvwxyz"
            out[i] = rng.choice(pool)
        if out != items:
            return " ".join(out)
    return answer + " " + answer  # a list of one repeated item cannot be swapped into a different answer


def task_prompt(example: TaskExample) -> list[dict[str, str]]:
    return [{"role": "user", "content": example.prompt}]


def synthetic_pairs(n: int, seed: int = 0, kinds: Sequence[str] = TASK_KINDS) -> list[PreferencePair]:
    """`n` (exact answer, near miss) pairs over `make_examples(n, seed, kinds)` (even seed: train half)."""
    rng = random.Random(seed)
    return [PreferencePair(task_prompt(ex), ex.answer, near_miss(ex.answer, rng), f"synthetic:{seed}:{i}")
            for i, ex in enumerate(make_examples(n, seed, kinds))]


def train_heldout_pairs(data: str, format: str, synthetic: int, heldout: float, seed: int
                        ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) pairs: a preference file split by `heldout` fraction, or, when `data` is empty,
    `synthetic` task-suite pairs for training and held-out ones from the disjoint held-out prompt half."""
    if data:
        return split_heldout(read_preference_pairs(data, format), heldout, seed)
    if synthetic < 1:
        raise LmforgeError(f"synthetic_pairs must be >= 1 when no data file is given, got {synthetic}")
    if not 0 < heldout < 1:
        raise LmforgeError(f"heldout must be in (0, 1), got {heldout}")
    return synthetic_pairs(synthetic, 2 * seed), synthetic_pairs(max(1, round(heldout * synthetic)), 2 * seed + 1)


@dataclass
class PairStageConfig(StageConfig):
    """The preference pairs a stage trains on (reward model, DPO): a file or synthetic task pairs."""

    data: str = option("", "preference JSONL/JSON (hh-rlhf, shp, pku, se, plain); empty = synthetic task pairs")
    format: str = option("auto", "preference format of `data` (auto detects it per record)")
    synthetic_pairs: int = option(1200, "training pairs drawn from the task suite when `data` is empty")
    heldout: float = option(0.1, "fraction of pairs held out for the before/after evaluation")
    max_len: int = option(128, "tokens per sequence; longer pairs are truncated (counted warning)")
    batch_size: int = option(16, "pairs per micro-batch")

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        require(self.max_len >= 2, "max_len", self.max_len, ">= 2")


def load_pairs(cfg: PairStageConfig, tokenizer: Tokenizer) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(train, held-out) pairs of `cfg`, tokenized."""
    train, held = train_heldout_pairs(cfg.data, cfg.format, cfg.synthetic_pairs, cfg.heldout, cfg.seed)
    return encode_pairs(tokenizer, train, cfg.max_len), encode_pairs(tokenizer, held, cfg.max_len)


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    source: str
    rating: float | None = None  # the pair's preference strength (PreferencePair.rating)


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[PreferencePair], max_len: int) -> list[EncodedPair]:
    """Tokenize both sides; a pair whose response is cut away entirely (prompt longer than max_len) is dropped
    with a counted warning naming the first such record."""
    out, dropped, cut = [], [], 0
    for p in pairs:
        c = encode_prompt_response(tokenizer, p.prompt, p.chosen, max_len)
        r = encode_prompt_response(tokenizer, p.prompt, p.rejected, max_len)
        if c.n_loss_tokens == 0 or r.n_loss_tokens == 0:
            dropped.append(p.source)
            continue
        cut += c.truncated or r.truncated
        out.append(EncodedPair(c, r, p.source, p.rating))
    if dropped:
        print(f"warning: dropped {len(dropped)} preference pair(s) whose prompt fills max_len={max_len} "
              f"(first: {dropped[0]})", file=sys.stderr)
    if cut:
        print(f"warning: truncated {cut} preference pair(s) to max_len={max_len} tokens", file=sys.stderr)
    if not out:
        raise LmforgeError(f"no preference pair fits max_len={max_len}")
    return out


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, labels) [2B, T]: the B chosen sequences, then the B rejected ones (one forward pass)."""
    return pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


PairScore = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (input_ids, labels) -> (chosen, rejected)


@torch.no_grad()
def score_pairs(model: nn.Module, score: PairScore, pairs: Sequence[EncodedPair], pad_id: int,
                batch_size: int = 32) -> Tensor:
    """[N, 2] (chosen, rejected) scores of every pair, `model` in eval mode, in chunks of `batch_size` pairs."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        ids, labels = collate_pairs(pairs[i:i + batch_size], pad_id)
        c, r = score(ids.to(device_of(model)), labels.to(device_of(model)))
        out.append(torch.stack([c, r], 1).cpu())
    model.train(was_training)
    return torch.cat(out)


class PairBatches:
    """Shuffled epochs of preference-pair batches for `train_loop`; `extra` holds per-pair tensors (e.g. the
    precomputed reference log-probs [N, 2]) that travel with each batch. Resumable by (epoch, position)."""

    def __init__(self, pairs: Sequence[EncodedPair], batch_size: int, pad_id: int, seed: int = 0,
                 extra: dict[str, Tensor] | None = None) -> None:
        self.pairs, self.batch_size, self.pad_id, self.seed = list(pairs), min(batch_size, len(pairs)), pad_id, seed
        self.extra = extra or {}
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.pairs), generator=g).tolist()

    def next_batch(self) -> dict[str, Tensor]:
        if self.position + self.batch_size > len(self.pairs):
            self.epoch, self.position = self.epoch + 1, 0
        idx = self._order()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        ids, labels = collate_pairs([self.pairs[i] for i in idx], self.pad_id)
        return {"input_ids": ids, "labels": labels, **{k: v[idx] for k, v in self.extra.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def split_heldout(pairs: list[Any], heldout: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Shuffle and split off a `heldout` fraction (at least one pair, at least one left for training)."""
    if not 0 < heldout < 1:
        raise LmforgeError(f"heldout must be in (0, 1), got {heldout}")
    if len(pairs) < 2:
        raise LmforgeError(f"need at least 2 preference pairs to hold some out, got {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    k = min(len(pairs) - 1, max(1, round(heldout * len(pairs))))
    return [pairs[i] for i in order[k:]], [pairs[i] for i in order[:k]]
