"""Each logits processor against distributions computed by hand from softmax([2, 1, 0])."""

from __future__ import annotations

import pytest
import torch

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.generate.sampling import (
    SamplingParams,
    apply_temperature,
    filtered_logits,
    sample_next,
    top_k_filter,
    top_p_filter,
)

LOGITS = torch.tensor([[2.0, 1.0, 0.0]])
# softmax([2, 1, 0]) = [e^2, e^1, e^0] / (e^2 + e + 1)
P_T1 = [0.665241, 0.244728, 0.090031]
# softmax([2, 1]) = [e^2, e] / (e^2 + e): what is left after keeping two tokens
P_TOP2 = [0.731059, 0.268941, 0.0]


def probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)


def close(t: torch.Tensor, expected: list[float]) -> bool:
    return torch.allclose(t, torch.tensor(expected).expand_as(t), atol=1e-5)


def test_temperature_matches_hand_computed():
    # T = 0.5: softmax([4, 2, 0]) = [e^4, e^2, 1] / (e^4 + e^2 + 1)
    assert close(probs(apply_temperature(LOGITS, 0.5)), [0.866813, 0.117310, 0.015876])
    # T = 2: softmax([1, 0.5, 0]) = [e, e^0.5, 1] / (e + e^0.5 + 1)
    assert close(probs(apply_temperature(LOGITS, 2.0)), [0.506480, 0.307196, 0.186324])
    assert close(probs(apply_temperature(LOGITS, 1.0)), P_T1)
    with pytest.raises(ValueError):
        apply_temperature(LOGITS, 0.0)


def test_top_k_keeps_k_and_ties_with_the_kth():
    assert close(probs(top_k_filter(LOGITS, 2)), P_TOP2)
    assert close(probs(top_k_filter(LOGITS, 1)), [1.0, 0.0, 0.0])
    assert torch.equal(top_k_filter(LOGITS, 0), LOGITS)
    assert torch.equal(top_k_filter(LOGITS, 3), LOGITS)
    tied = top_k_filter(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 2)
    assert int(torch.isfinite(tied).sum()) == 3  # as HF: a tie with the k-th is never broken by index


def test_top_p_keeps_smallest_set_reaching_p():
    # cumulative mass in order: 0.665, 0.910, 1.0
    assert close(probs(top_p_filter(LOGITS, 0.8)), P_TOP2)  # 0.665 < 0.8 -> needs the second token
    assert close(probs(top_p_filter(LOGITS, 0.6)), [1.0, 0.0, 0.0])  # first token alone reaches 0.6
    assert close(probs(top_p_filter(LOGITS, 0.95)), P_T1)  # needs all three
    assert close(probs(top_p_filter(LOGITS, 1e-6)), [1.0, 0.0, 0.0])  # always at least one token
    assert torch.equal(top_p_filter(LOGITS, 1.0), LOGITS)


def test_top_p_maps_back_to_vocabulary_order_per_row():
    logits = torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.0, 2.0]])
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[False, True, True], [True, False, True]]


def test_processors_compose_in_hf_order():
    # T = 0.5 then top-k 2: softmax([4, 2]) = [e^4, e^2] / (e^4 + e^2)
    p = probs(filtered_logits(LOGITS, SamplingParams(temperature=0.5, top_k=2)))
    assert close(p, [0.880797, 0.119203, 0.0])
    # T = 0.5 then top-p 0.8: the first token alone has 0.867 >= 0.8
    p = probs(filtered_logits(LOGITS, SamplingParams(temperature=0.5, top_p=0.8)))
    assert close(p, [1.0, 0.0, 0.0])


def test_greedy_and_zero_temperature_are_argmax():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    expected = logits.argmax(-1)
    assert torch.equal(sample_next(logits, SamplingParams(greedy=True, temperature=5.0), None), expected)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0.0), None), expected)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=-1.0), None), expected)


def test_sampling_frequencies_match_filtered_distribution():
    n = 40_000
    draws = sample_next(LOGITS.expand(n, 3), SamplingParams(top_k=2), torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=3).float() / n
    assert torch.allclose(freq, torch.tensor(P_TOP2), atol=0.01)
    assert int(freq[2] * n) == 0  # filtered tokens are never drawn
    generator = torch.Generator().manual_seed(2)
    draws = sample_next(LOGITS.expand(n, 3), SamplingParams(temperature=2.0), generator)
    freq = torch.bincount(draws, minlength=3).float() / n
    assert torch.allclose(freq, torch.tensor([0.506480, 0.307196, 0.186324]), atol=0.01)


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a = sample_next(logits, params, torch.Generator().manual_seed(7))
    b = sample_next(logits, params, torch.Generator().manual_seed(7))
    c = sample_next(logits, params, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampling_params_reject_bad_values():
    for bad, field in [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
                       ({"max_new_tokens": -2}, "max_new_tokens")]:
        with pytest.raises(ConfigError, match=field):
            from_dict(SamplingParams, bad)
    with pytest.raises(ConfigError, match="stop_token_ids"):
        from_dict(SamplingParams, {"stop_token_ids": ["x"]})
    assert from_dict(SamplingParams, {"stop_token_ids": "1,2"}).stop_token_ids == [1, 2]
