"""Rollouts for on-policy RL (GRPO, PPO): sample completions, score them, and serve them to `train_loop`.

A rollout is a batch of prompt+completion sequences, right-padded, with per-token masks over the
completion and the log-probs of the policy that sampled it (pi_old) and of the frozen reference.
`RolloutBatches` is the resumable batch source `train_loop` wants: each `next_batch` is one minibatch;
after `epochs` passes over a rollout it samples a fresh one from the (now updated) policy. So one
optimizer step = one minibatch update, and the PPO/GRPO "several inner iterations per rollout" fall out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.core.tensors import IGNORE_INDEX
from lmforge.data.formats import Message
from lmforge.generate.batch import generate_batch
from lmforge.generate.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import prompt_ids, stop_token_ids

Rollout = dict[str, Tensor]  # every value [N, ...] on the CPU; minibatches slice dim 0


def pack_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int
                   ) -> tuple[Tensor, Tensor]:
    """Right-padded (input_ids, labels) [N, T] for prompt+completion, aligned for `sequence_logps`:
    labels[t] is the token after input_ids[t], IGNORE_INDEX except on completion tokens. T = longest - 1."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s) - 1] = torch.tensor(s[:-1])
        if len(s) > len(p):
            labels[i, len(p) - 1: len(s) - 1] = torch.tensor(s[len(p):])
    return ids, labels


def token_logps(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(label_t) per position [N, T] in fp32, 0 where the label is IGNORE_INDEX.

    `temperature` is the sampling temperature: the policy that sampled a rollout is softmax(logits / T), so
    its ratios and KL terms must be taken at the same T (as TRL's GRPO/PPO trainers divide the logits)."""
    mask = labels != IGNORE_INDEX
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    out = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return out * mask


@torch.no_grad()
def model_token_logps(model: nn.Module, ids: Tensor, labels: Tensor, temperature: float = 1.0,
                      batch_size: int = 64) -> Tensor:
    """`token_logps` of `model` (at `temperature`) on CPU tensors, in eval mode in chunks; returns CPU fp32."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        parts = [token_logps(model(ids[i:i + batch_size].to(device)), labels[i:i + batch_size].to(device),
                             temperature).cpu()
                 for i in range(0, len(ids), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts)


class RolloutBatches:
    """Minibatches of rollouts made on demand by `make_rollout(index) -> Rollout`.

    Each rollout is shuffled and served `epochs` times in `minibatches` slices; then the next rollout is
    made (from the current policy). A rollout cannot be remade exactly after a resume (the policy moved),
    so the saved state is only the rollout counter: a resumed run starts the next rollout.
    """

    def __init__(self, make_rollout: Callable[[int], Rollout], epochs: int, minibatches: int, seed: int = 0) -> None:
        self.make_rollout, self.epochs, self.minibatches, self.seed = make_rollout, epochs, minibatches, seed
        self.index = 0  # rollouts made so far
        self.position = 0  # minibatches served from the current rollout
        self.current: Rollout | None = None
        self.order: list[Tensor] = []

    def next_batch(self) -> Rollout:
        if self.current is None or self.position >= self.epochs * self.minibatches:
            self._new_rollout()
        epoch, part = divmod(self.position, self.minibatches)
        order = self.order[epoch]
        n = len(order)
        lo, hi = part * n // self.minibatches, (part + 1) * n // self.minibatches
        self.position += 1
        assert self.current is not None
        return {k: v[order[lo:hi]] for k, v in self.current.items()}

    def _new_rollout(self) -> None:
        self.current = self.make_rollout(self.index)
        n = len(next(iter(self.current.values())))
        if n < self.minibatches:
            raise ValueError(f"a rollout of {n} sequences cannot split into {self.minibatches} minibatches")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
        self.order = [torch.randperm(n, generator=g) for _ in range(self.epochs)]
        self.index += 1
        self.position = 0

    @staticmethod
    def rank_slice(batch: Rollout, rank: int, world: int) -> Rollout:
        """Rank `rank`'s rows of a global minibatch (as equal as the row count allows) with two loss scales:
        `row_scale` = world x its share of the rows and `token_scale` = world x its share of the completion tokens.
        A rank's mean over sequences (or over tokens) times its scale, averaged over ranks as DDP/FSDP average
        gradients, is the global minibatch's mean, so N processes take one process's steps."""
        rows = len(batch["mask"])
        if rows < world:
            raise ValueError(f"a minibatch of {rows} completions cannot give each of {world} ranks one")
        idx = torch.arange(rows).tensor_split(world)[rank]
        out = {k: v[idx] for k, v in batch.items()}
        tokens = batch["mask"].sum().clamp(min=1)
        out["row_scale"] = torch.tensor(world * len(idx) / rows)
        out["token_scale"] = world * out["mask"].sum() / tokens
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index, self.current, self.position = int(state["index"]), None, 0


# ----------------------------------------------------------------------------------------------
# sampling completions of chat prompts


def chat_prompt_ids(tokenizer: Tokenizer, prompts: list[list[Message]]) -> list[list[int]]:
    """Chat-templated prompt tokens (with the assistant header), as SFT encodes them."""
    return [prompt_ids(tokenizer, messages) for messages in prompts]


def sample_completions(model: nn.Module, tokenizer: Tokenizer, prompts: list[list[int]], params: SamplingParams,
                       n: int = 1, seed: int | None = None, seeds: list[int] | None = None
                       ) -> tuple[list[list[int]], list[str]]:
    """`n` completions per prompt (prompt-major), as tokens WITH the stop token and as text without it; `seeds`
    (one per prompt) draws each prompt's completions from its own generator (see `generate_batch`)."""
    stops = set(stop_token_ids(tokenizer))
    params = dataclasses.replace(params, stop_token_ids=sorted(stops | set(params.stop_token_ids)))
    tokens = generate_batch(model, prompts, params, n, seed=seed, keep_stop=True, seeds=seeds)
    texts = [tokenizer.decode([t for t in row if t not in stops]) for row in tokens]
    return tokens, texts


def greedy_completions(model: nn.Module, tokenizer: Tokenizer, prompts: list[list[Message]],
                       max_new_tokens: int = 24) -> list[str]:
    """Greedy replies of `model` to chat prompts (the held-out evaluation of every RL stage)."""
    _, texts = sample_completions(model, tokenizer, chat_prompt_ids(tokenizer, prompts),
                                  SamplingParams(greedy=True, max_new_tokens=max_new_tokens))
    return texts
