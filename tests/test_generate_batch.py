"""Batched sampling: left padding + per-row positions + KV cache give each row what it gets alone."""

from __future__ import annotations

import pytest
import torch
from tinymodels import mha_model as tiny_model

from lmforge.generate.batch import generate_batch, prefill_mask
from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams

PROMPTS = [[5, 9, 3], [7], [1, 2, 3, 4, 5, 6, 7, 8], [11, 12]]


@pytest.mark.parametrize("position", ["rope", "learned", "sinusoidal"])
def test_greedy_batch_equals_single_sequence_generate(position):
    model = tiny_model(64, seed=1, position=position, init_std=0.2)
    params = SamplingParams(greedy=True, max_new_tokens=12)
    batch = generate_batch(model, PROMPTS, params)
    single = [generate(model, p, params) for p in PROMPTS]
    assert batch == single
    assert all(len(row) == 12 for row in batch)  # no stop tokens: every row runs the full budget


def test_per_row_stop_tokens_end_only_that_row():
    model = tiny_model(64, seed=1, init_std=0.2)
    free = generate_batch(model, PROMPTS, SamplingParams(greedy=True, max_new_tokens=10))
    stop = free[0][3]  # the 4th token of row 0
    params = SamplingParams(greedy=True, max_new_tokens=10, stop_token_ids=[stop])
    stopped = generate_batch(model, PROMPTS, params)
    for full, row in zip(free, stopped):
        cut = full.index(stop) if stop in full else len(full)
        assert row == full[:cut]
    assert stopped == [generate(model, p, params) for p in PROMPTS]


def test_num_return_sequences_are_prompt_major_and_seeded():
    model = tiny_model(64, seed=2, init_std=0.3)
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    a = generate_batch(model, PROMPTS[:2], params, num_return_sequences=3, seed=7)
    b = generate_batch(model, PROMPTS[:2], params, num_return_sequences=3, seed=7)
    assert a == b and len(a) == 6
    assert len({tuple(r) for r in a[:3]}) > 1  # samples of one prompt differ
    greedy = generate_batch(model, PROMPTS[:2], SamplingParams(greedy=True, max_new_tokens=5), 2)
    assert greedy[0] == greedy[1] and greedy[2] == greedy[3]


def test_per_prompt_seeds_make_a_prompts_samples_independent_of_its_batch():
    """With one seed per prompt, a prompt's samples are the same alone, in another batch, or split off (what lets
    data-parallel RL ranks each sample their share of a rollout and get one process's samples)."""
    model = tiny_model(64, seed=2, init_std=0.3)
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    together = generate_batch(model, PROMPTS, params, 3, seeds=[10, 11, 12, 13])
    assert len({tuple(r) for r in together[:3]}) > 1  # a prompt's samples still differ
    halves = (generate_batch(model, PROMPTS[:2], params, 3, seeds=[10, 11])
              + generate_batch(model, PROMPTS[2:], params, 3, seeds=[12, 13]))
    assert halves == together
    assert generate_batch(model, [PROMPTS[2]], params, 3, seeds=[12]) == together[6:9]
    with pytest.raises(ValueError, match="one per prompt"):
        generate_batch(model, PROMPTS, params, seeds=[1])


def test_budget_respects_max_seq_len_and_mode_is_restored():
    model = tiny_model(64, seed=1, max_seq_len=16).train()
    out = generate_batch(model, [[1] * 10, [2] * 4], SamplingParams(greedy=True, max_new_tokens=50))
    assert [len(r) for r in out] == [6, 6]
    assert model.training
    assert generate_batch(model, [], SamplingParams()) == []


def test_prefill_mask_hides_padding_and_keeps_pad_rows_non_empty():
    m = prefill_mask(torch.tensor([2, 0]), 4)[:, 0]
    assert m[0, 3].tolist() == [False, False, True, True]
    assert m[0, 0].tolist() == [True, False, False, False]  # a pad query sees itself only
    assert m[1].tril().equal(m[1]) and m[1].all(-1).tolist() == [False, False, False, True]


def test_keep_stop_appends_the_stop_token_once():
    model = tiny_model(64, seed=1, init_std=0.2)
    free = generate_batch(model, PROMPTS, SamplingParams(greedy=True, max_new_tokens=10))
    stop = free[0][3]
    params = SamplingParams(greedy=True, max_new_tokens=10, stop_token_ids=[stop])
    kept = generate_batch(model, PROMPTS, params, keep_stop=True)
    for full, row in zip(free, kept):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]
