"""Inference-time search: best-of-N picks the top-scored sample; step beam search keeps the best partial solutions."""

from __future__ import annotations

import pytest
from tinymodels import mha_model, text_tokenizer

from lmforge.generate.sampling import SamplingParams
from lmforge.posttrain.reward import RewardModel
from lmforge.posttrain.search import (
    best_of_n,
    newline_token_ids,
    reward_model_scorer,
    step_beam_search,
    verifier_scorer,
)
from lmforge.tasks.suite import TaskExample

PROMPT = [{"role": "user", "content": "copy: a b c"}]


@pytest.fixture(scope="module")
def setup():
    tok = text_tokenizer()
    return mha_model(tok.vocab_size, seed=3, init_std=0.1), tok


def test_best_of_n_returns_the_argmax_of_the_scorer(setup):
    model, tok = setup
    res = best_of_n(model, tok, PROMPT, lambda p, texts: [float(len(t)) for t in texts], n=6,
                    params=SamplingParams(max_new_tokens=8))
    assert len(res.candidates) == 6 and res.score == max(res.scores) and res.best in res.candidates
    assert len(set(res.candidates)) > 1
    ex = TaskExample("copy", "copy: a b c", "a b c")
    res = best_of_n(model, tok, PROMPT, verifier_scorer(ex), n=4, params=SamplingParams(max_new_tokens=4))
    assert res.scores == [0.0] * 4  # an untrained model never gets it right


def test_step_beam_search_beats_or_matches_single_samples(setup):
    model, tok = setup
    assert newline_token_ids(tok) and all("\n" in tok.decode([i], skip_special_tokens=False)
                                          for i in newline_token_ids(tok))

    def scorer(prompt, texts):  # prefer solutions with many letters 'e' (a stand-in process reward)
        return [float(t.count("e")) for t in texts]

    params = SamplingParams(max_new_tokens=10)
    res = step_beam_search(model, tok, PROMPT, scorer, beam_width=2, expansions=4, max_steps=3, params=params)
    assert len(res.candidates) == 2 and res.scores == sorted(res.scores, reverse=True)
    single = best_of_n(model, tok, PROMPT, scorer, n=1, params=params, seed=0)
    assert res.score >= single.score


def test_reward_model_scorer_scores_each_text(setup):
    model, tok = setup
    rm = RewardModel(model).eval()
    scores = reward_model_scorer(rm, tok)(PROMPT, ["a b c", "x"])
    assert len(scores) == 2 and scores[0] != scores[1]
