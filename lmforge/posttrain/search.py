"""Inference-time search for reasoning: best-of-N and beam search over reasoning steps.

A scorer maps (prompt, completions) to one number each: a verifier (`tasks.task_reward`) or a reward
model (`score_texts`). Best-of-N samples N completions and keeps the top one (Cobbe et al. 2021's
verifier-guided selection). Step-level beam search treats each line as a reasoning step: every beam is
extended by sampled next steps, the partial solutions are scored by a process reward (a reward model
applied to the solution so far, Lightman et al. 2023 style), and the best `beam_width` survive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lmforge.data.formats import Message
from lmforge.generate.batch import generate_batch
from lmforge.generate.sampling import SamplingParams
from lmforge.posttrain.reward import RewardModel, score_texts
from lmforge.tasks.suite import TaskExample, task_reward
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import prompt_ids, stop_token_ids

Scorer = Callable[[list[Message], list[str]], list[float]]


def verifier_scorer(example: TaskExample) -> Scorer:
    """Exact-match verifier of one task example as a scorer."""
    return lambda prompt, texts: [task_reward(example, t) for t in texts]


def reward_model_scorer(rm: RewardModel, tokenizer: Tokenizer) -> Scorer:
    """A (process) reward model as a scorer: each (partial) solution is scored as a complete assistant turn."""
    return lambda prompt, texts: score_texts(rm, tokenizer, [prompt] * len(texts), texts)


@dataclass
class SearchResult:
    best: str
    score: float
    candidates: list[str]  # every scored candidate (final beams for beam search)
    scores: list[float]


def best_of_n(model: nn.Module, tokenizer: Tokenizer, prompt: list[Message], scorer: Scorer, n: int = 8,
              params: SamplingParams | None = None, seed: int | None = 0) -> SearchResult:
    """Sample `n` completions and keep the highest-scoring one (ties: the first sampled)."""
    params = params or SamplingParams(temperature=1.0, max_new_tokens=32)
    stops = stop_token_ids(tokenizer)
    params = dataclasses.replace(params, stop_token_ids=stops)
    rows = generate_batch(model, [prompt_ids(tokenizer, prompt)], params, n, seed=seed)
    texts = [tokenizer.decode(r) for r in rows]
    scores = scorer(prompt, texts)
    i = max(range(n), key=lambda k: scores[k])
    return SearchResult(texts[i], scores[i], texts, scores)


def newline_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Every token whose text contains a newline: a step ends when one is sampled."""
    return [i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i], skip_special_tokens=False)]


def step_beam_search(model: nn.Module, tokenizer: Tokenizer, prompt: list[Message], scorer: Scorer,
                     beam_width: int = 2, expansions: int = 4, max_steps: int = 4,
                     params: SamplingParams | None = None, seed: int = 0) -> SearchResult:
    """Beam search whose unit is a reasoning step (text up to a newline) instead of a token.

    Each round samples `expansions` next steps for every unfinished beam (in one batch), scores every
    candidate partial solution with `scorer`, and keeps the best `beam_width` (finished beams compete
    too). A beam finishes at the end-of-turn token or when its step hits the token budget.
    """
    params = params or SamplingParams(temperature=1.0, max_new_tokens=24)
    ends = set(stop_token_ids(tokenizer))
    step_params = dataclasses.replace(params, stop_token_ids=sorted(ends | set(newline_token_ids(tokenizer))))
    base = prompt_ids(tokenizer, prompt)
    beams: list[tuple[list[int], bool, float]] = [([], False, float("-inf"))]  # (tokens, finished, score)
    for step in range(max_steps):
        open_beams = [b for b in beams if not b[1]]
        if not open_beams:
            break
        rows = generate_batch(model, [base + b[0] for b in open_beams], step_params, expansions,
                              seed=seed + step, keep_stop=True)
        candidates = []
        for k, row in enumerate(rows):
            tokens = open_beams[k // expansions][0] + row
            finished = (bool(row) and row[-1] in ends) or len(row) >= params.max_new_tokens or not row
            candidates.append((tokens, finished or step + 1 == max_steps))
        texts = [_text(tokenizer, t, ends) for t, _ in candidates]
        scores = scorer(prompt, texts)
        pool = [b for b in beams if b[1]] + [(t, f, s) for (t, f), s in zip(candidates, scores)]
        beams = sorted(pool, key=lambda b: -b[2])[:beam_width]
    texts = [_text(tokenizer, b[0], ends) for b in beams]
    return SearchResult(texts[0], beams[0][2], texts, [b[2] for b in beams])


def _text(tokenizer: Tokenizer, tokens: list[int], ends: set[int]) -> str:
    return tokenizer.decode([t for t in tokens if t not in ends])
