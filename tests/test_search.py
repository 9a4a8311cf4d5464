"""Search primitives on an untrained model: best-of-N keeps the scorer's argmax, a step ends at a newline token,
and an outcome reward model ranks whole responses. (The reasoning task, the PRM and the search methods are
tested in tests/test_reasoning.py.)"""

from __future__ import annotations

import pytest
from tinymodels import mha_model, text_tokenizer

from lmforge.generate.sampling import SamplingParams
from lmforge.posttrain.reward import RewardModel, score_texts
from lmforge.posttrain.search import Sampler, best_of_n, newline_token_ids

PROMPT = [{"role": "user", "content": "copy: a b c"}]


@pytest.fixture(scope="module")
def setup():
    tok = text_tokenizer()
    return mha_model(tok.vocab_size, seed=3, init_std=0.1), tok


def test_best_of_n_returns_the_argmax_of_the_scorer(setup):
    model, tok = setup
    sampler = Sampler(model, tok, PROMPT, SamplingParams(temperature=1.0, max_new_tokens=8))
    res = best_of_n(sampler, lambda texts: [float(len(t)) for t in texts], n=6)
    assert len(res.candidates) == 6 and res.score == max(res.scores) and res.best in res.candidates
    assert len(set(res.candidates)) > 1 and res.tokens == sampler.tokens > 0
    assert res.answer is None  # an untrained model writes no answer step


def test_a_step_ends_at_a_newline_token(setup):
    model, tok = setup
    newlines = newline_token_ids(tok)
    assert newlines and all("\n" in tok.decode([i], skip_special_tokens=False) for i in newlines)
    sampler = Sampler(model, tok, PROMPT, SamplingParams(temperature=1.0, max_new_tokens=10))
    steps = sampler.sample([""], 6, one_step=True)
    assert all(finished or "\n" in text for text, finished in steps)  # an open step stopped at a newline


def test_an_outcome_reward_model_ranks_responses(setup):
    model, tok = setup
    rm = RewardModel(model).eval()
    sampler = Sampler(model, tok, PROMPT, SamplingParams(temperature=1.0, max_new_tokens=6))
    res = best_of_n(sampler, lambda texts: score_texts(rm, tok, [PROMPT] * len(texts), texts), n=4)
    assert res.scores == score_texts(rm, tok, [PROMPT] * 4, res.candidates) and res.score == max(res.scores)
