"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a cheap drafter proposes gamma
tokens, the target model scores all of them in ONE forward pass, and a prefix is accepted.

- Greedy: draft token i is accepted while it equals the target's argmax after the tokens before
  it; the first mismatch is replaced by the target's token (and if all gamma match, the target's
  next token is a free bonus). The output is exactly the target's greedy output (tested).
- Sampling (Leviathan et al., Algorithm 1): draft token x ~ q is accepted with probability
  min(1, p(x) / q(x)); on rejection the token is drawn from norm(max(0, p - q)). The output is
  distributed exactly as sampling from the target p. Both p and q are the distributions after
  the same logits processors (penalties, temperature, top-k/p, min-p).

The drafter is an interface (`Drafter`): `DraftModel` wraps a small model with its own KV cache;
`MTPDrafter` drafts with the target's own multi-token-prediction heads (DeepSeek-V3 section 2.2,
`lmforge.model.mtp`) from the target's final hidden states, which every verification pass hands over.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.generate.processors import History
from lmforge.generate.prompt import check_prompt, fit_prompt
from lmforge.generate.sampling import SamplingParams, filtered_logits, new_generator
from lmforge.model.mtp import draft_logits


@dataclass
class SpecStats:
    """Counts of one speculative run; `acceptance_rate` = accepted draft tokens / proposed."""

    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0
    tokens: int = 0
    per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.tokens / self.target_calls if self.target_calls else 0.0


def distribution(logits: torch.Tensor, params: SamplingParams, history: History | None) -> torch.Tensor:
    """Probabilities [B, V] after `params`' processors; one-hot on the argmax when greedy."""
    z = filtered_logits(logits, params, history)
    if params.is_greedy:
        return torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).float()
    return torch.softmax(z, dim=-1)


class Drafter(Protocol):
    def propose(self, seq: list[int], n: int, params: SamplingParams, generator: torch.Generator | None
                ) -> tuple[list[int], torch.Tensor]:
        """n draft tokens continuing `seq` and their draft distributions q [n, V]."""
        ...

    def accepted(self, seq: list[int], hidden: torch.Tensor, start: int) -> None:
        """`seq` is the sequence after verification: forget any state past what it confirms. `hidden` [m, d]
        are the target's final hidden states at positions start..start+m-1 (= len(seq) - 2 at the end:
        every position but the last, whose token the target has not read yet)."""
        ...


class DraftModel:
    """A small causal LM as drafter, with a KV cache that survives rounds: after verification only the
    cache slots of the confirmed tokens are kept (later slots are simply overwritten)."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(1, max_len)
        self.cached: list[int] = []  # tokens whose keys/values are valid in the cache

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        start = len(self.cached)
        logits = self.model(torch.tensor([tokens], device=self.device), cache=self.cache, start_pos=start)[:, -1]
        self.cached += tokens
        return logits

    def propose(self, seq: list[int], n: int, params: SamplingParams, generator: torch.Generator | None
                ) -> tuple[list[int], torch.Tensor]:
        n = min(n, self.cache.max_len + 1 - len(seq))  # feeding seq + n - 1 drafts must fit the draft's cache
        if n <= 0:
            return [], torch.empty(0)
        logits = self._feed(seq[len(self.cached):]).float().cpu()
        tokens, qs = [], []
        for i in range(n):
            history = History.of([seq + tokens], len(seq)) if params.needs_history else None
            q = distribution(logits, params, history)[0]
            token = int(torch.multinomial(q, 1, generator=generator)) if not params.is_greedy else int(q.argmax())
            tokens.append(token)
            qs.append(q)
            if i + 1 < n:
                logits = self._feed([token]).float().cpu()
        return tokens, torch.stack(qs)

    def accepted(self, seq: list[int], hidden: torch.Tensor, start: int) -> None:
        n = 0
        for a, b in zip(self.cached, seq, strict=False):
            if a != b:
                break
            n += 1
        self.cached = self.cached[:n]


class MTPDrafter:
    """Drafts with the target's MTP modules: depth k, at the last position whose hidden state the target
    has computed (len(seq) - 2), embeds the k tokens after it (seq[-1] and the k-1 drafts so far) and
    predicts the next draft. The MTP blocks keep no cache: they re-read the whole sequence each call, which
    is cheap next to the main stack for the one-block modules DeepSeek-V3 uses."""

    def __init__(self, model: nn.Module) -> None:
        if getattr(model, "mtp", None) is None:
            raise LmforgeError("speculative decoding with MTP heads: the model has none (model.mtp_depth = 0)")
        self.model = model
        self.depth = model.cfg.mtp_depth
        self.hidden = torch.empty(0, model.cfg.d_model, device=next(model.parameters()).device)

    def propose(self, seq: list[int], n: int, params: SamplingParams, generator: torch.Generator | None
                ) -> tuple[list[int], torch.Tensor]:

        n = min(n, self.depth, self.model.context_length - len(seq) + 1)
        last = len(seq) - 2  # the newest position with a target hidden state
        if n <= 0 or last < 0 or self.hidden.shape[0] != last + 1:
            return [], torch.empty(0)
        device = self.hidden.device
        tokens, qs = [], []
        for k in range(1, n + 1):
            # positions past `last` are padding: causal attention keeps them from position `last`
            follow = seq[1:] + tokens + [0] * (self.depth - k)
            pad = torch.zeros(len(follow) - self.hidden.shape[0], self.hidden.shape[1], device=device)
            hidden = torch.cat([self.hidden, pad])[None]
            logits = draft_logits(self.model, hidden, torch.tensor([follow], device=device))[k - 1][0, last]
            history = History.of([seq + tokens], len(seq)) if params.needs_history else None
            q = distribution(logits[None].float().cpu(), params, history)[0]
            token = int(q.argmax()) if params.is_greedy else int(torch.multinomial(q, 1, generator=generator))
            tokens.append(token)
            qs.append(q)
        return tokens, torch.stack(qs)

    def accepted(self, seq: list[int], hidden: torch.Tensor, start: int) -> None:
        self.hidden = torch.cat([self.hidden[:start], hidden])


def check_draft(target: nn.Module, draft: nn.Module) -> None:
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise LmforgeError(f"speculative decoding: draft vocab_size {draft.cfg.vocab_size} differs from the "
                           f"target's {target.cfg.vocab_size}; both must share one tokenizer")


def speculative_stream(target: nn.Module, drafter: Drafter, prompt_ids: Sequence[int], params: SamplingParams,
                       num_draft: int = 4, stats: SpecStats | None = None) -> Iterator[int]:
    """Yield new tokens (stop token not yielded) as each verification round accepts them; `stats`
    (if given) is filled in as the run goes."""
    if num_draft < 1:
        raise ConfigError(f"num_draft_tokens must be >= 1, got {num_draft}")
    check_prompt(prompt_ids, target.cfg.vocab_size)
    prompt = fit_prompt(prompt_ids, target.context_length)
    return _run(target, drafter, prompt, params, num_draft, stats if stats is not None else SpecStats())


@torch.no_grad()  # a decorated generator function runs every step without autograd
def _run(target: nn.Module, drafter: Drafter, prompt: list[int], params: SamplingParams, gamma: int,
         stats: SpecStats) -> Iterator[int]:
    device = next(target.parameters()).device
    budget = min(params.max_new_tokens, target.context_length - len(prompt))
    generator = new_generator(params.seed, torch.device("cpu"))
    stop = set(params.stop_token_ids)
    was_training = target.training
    target.eval()
    try:
        cache = target.new_cache(1, target.context_length)
        seq = list(prompt)
        # the target caches all but the last token: each round feeds it together with the drafts
        if len(seq) > 1:
            hidden = target(torch.tensor([seq[:-1]], device=device), cache=cache, start_pos=0, return_hidden=True)
            drafter.accepted(seq, hidden[0], 0)
        produced = 0
        while produced < budget:
            n = min(gamma, budget - produced - 1, target.context_length - len(seq))
            drafts, q = drafter.propose(seq, n, params, generator) if n > 0 else ([], None)
            start = len(seq) - 1
            hidden = target(torch.tensor([seq[-1:] + drafts], device=device), cache=cache, start_pos=start,
                            return_hidden=True)[0]
            logits = target.lm_head(hidden).float().cpu()  # [n + 1, V]
            stats.target_calls += 1
            new = verify(logits, drafts, q, seq, len(prompt), params, generator)
            stats.proposed += len(drafts)
            stats.accepted += len(new) - 1
            stats.per_round.append(len(new) - 1)
            for token in new:
                if token in stop:
                    return
                yield token
                seq.append(token)
                produced += 1
                stats.tokens += 1
                if produced == budget:
                    return
            drafter.accepted(seq, hidden[:len(new)], start)  # the fed tokens now confirmed: all but the newest
    finally:
        target.train(was_training)


def verify(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, seq: list[int], n_prompt: int,
           params: SamplingParams, generator: torch.Generator | None) -> list[int]:
    """Accepted draft tokens plus one token from the target (correction or bonus): 1..len(drafts)+1 tokens.

    `logits[i]` is the target's next-token logits after seq + drafts[:i]."""
    out: list[int] = []
    for i in range(len(drafts) + 1):
        history = History.of([seq + drafts[:i]], n_prompt) if params.needs_history else None
        p = distribution(logits[i:i + 1], params, history)[0]
        if i == len(drafts):  # every draft accepted: the target's next token comes free
            return out + [_draw(p, params, generator)]
        x = drafts[i]
        if params.is_greedy:
            accept = int(p.argmax()) == x
        else:
            ratio = float(p[x] / q[i, x]) if q[i, x] > 0 else 0.0
            accept = float(torch.rand((), generator=generator)) < min(1.0, ratio)
        if not accept:
            residual = p if params.is_greedy else (p - q[i]).clamp(min=0)
            if float(residual.sum()) <= 0:  # p == q exactly: any draw from p is correct
                residual = p
            return out + [_draw(residual / residual.sum(), params, generator)]
        out.append(x)
    return out


def _draw(p: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.is_greedy:
        return int(p.argmax())
    return int(torch.multinomial(p, 1, generator=generator))


def speculative_generate(target: nn.Module, draft: nn.Module, prompt_ids: Sequence[int], params: SamplingParams,
                         num_draft: int = 4) -> tuple[list[int], SpecStats]:
    """New tokens from speculative decoding with a draft model, and the run's statistics."""
    check_draft(target, draft)
    was_training = draft.training
    draft.eval()
    try:
        stats = SpecStats()
        drafter = DraftModel(draft, min(draft.context_length, target.context_length))
        return list(speculative_stream(target, drafter, prompt_ids, params, num_draft, stats)), stats
    finally:
        draft.train(was_training)
