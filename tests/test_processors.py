"""Every logits processor against distributions computed by hand, their composition in the engines,
and the named sampling presets (library and `lmforge generate --preset`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tinymodels import debug_model

from lmforge.cli import main
from lmforge.core.errors import ConfigError
from lmforge.generate.batch import generate_batch
from lmforge.generate.engine import generate
from lmforge.generate.presets import PRESETS, apply_preset, describe_preset
from lmforge.generate.processors import (
    History,
    MinP,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    apply_processors,
    banned_ngram_tokens,
    frequency_presence_penalty,
    min_p_filter,
    no_repeat_ngram,
    repetition_penalty,
)
from lmforge.generate.sampling import SamplingParams, processors_for, sample_next
from lmforge.model import Transformer, save_model

E = math.e
LOGITS = torch.tensor([[2.0, 1.0, 0.0]])  # softmax = [e^2, e, 1] / (e^2 + e + 1) = [.665, .245, .090]
Z = E**2 + E + 1


def probs(logits: torch.Tensor) -> list[float]:
    return torch.softmax(logits, dim=-1)[0].tolist()


def close(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) < 1e-6 for x, y in zip(a, b, strict=True))


def test_min_p_threshold_scales_with_top_probability():
    # threshold 0.3 * 0.665 = 0.200: token 1 (0.245) stays, token 2 (0.090) goes
    assert close(probs(min_p_filter(LOGITS, 0.3)), [E**2 / (E**2 + E), E / (E**2 + E), 0.0])
    # threshold 0.4 * 0.665 = 0.266 > 0.245: only the top token is left
    assert close(probs(min_p_filter(LOGITS, 0.4)), [1.0, 0.0, 0.0])
    assert torch.equal(min_p_filter(LOGITS, 0.0), LOGITS)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    history = History(torch.tensor([[-1, 0, 1, 1]]), n_prompt=4)  # -1 is padding: token 0 is seen, not padding
    out = repetition_penalty(logits, history, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    # the distribution by hand: softmax([1, -2, 0.5, 3])
    z = E**1 + E**-2 + E**0.5 + E**3
    assert close(probs(out), [E / z, E**-2 / z, E**0.5 / z, E**3 / z])


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    logits = torch.zeros(1, 4)
    history = History(torch.tensor([[3, 3, 1, 1, 2]]), n_prompt=2)  # prompt [3, 3], generated [1, 1, 2]
    out = frequency_presence_penalty(logits, history, frequency=0.5, presence=0.25)
    assert out.tolist() == [[0.0, -1.25, -0.75, 0.0]]  # c = [0, 2, 1, 0]; token 3 only in the prompt
    z = 2 + E**-1.25 + E**-0.75
    assert close(probs(out), [1 / z, E**-1.25 / z, E**-0.75 / z, 1 / z])


def test_no_repeat_ngram_bans_completions_of_seen_ngrams():
    assert banned_ngram_tokens([1, 2, 3, 1], 2) == [2]
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 1, 3, 1], 2) == [2, 3]
    assert banned_ngram_tokens([4, 5], 3) == []  # the tail (4, 5) never occurred earlier
    assert banned_ngram_tokens([7, 7, 8], 1) == [7, 8]
    history = History.of([[1, 2, 3, 1], [2, 2]], n_prompt=2)  # second row left-padded with -1
    out = no_repeat_ngram(torch.zeros(2, 4), history, 2)
    assert close(probs(out[:1]), [1 / 3, 1 / 3, 0.0, 1 / 3])  # (1, 2) seen: 2 may not follow 1 again
    assert close(probs(out[1:]), [1 / 3, 1 / 3, 0.0, 1 / 3])  # (2, 2) seen; padding makes no n-grams


def test_processors_compose_like_hand_computation():
    # temperature 2 -> [1, .5, 0]; top-k 2 keeps [1, .5]; distribution [e, e^.5] / (e + e^.5)
    out = apply_processors(LOGITS, [Temperature(2.0), TopK(2), TopP(1.0), MinP(0.0)])
    assert close(probs(out), [E / (E + E**0.5), E**0.5 / (E + E**0.5), 0.0])
    # the order matters: top-p 0.6 keeps only the top token, before or after temperature
    assert close(probs(apply_processors(LOGITS, [TopP(0.6), Temperature(5.0)])), [1.0, 0.0, 0.0])
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.9, min_p=0.1, repetition_penalty=1.3,
                            no_repeat_ngram_size=2)
    kinds = [type(p).__name__ for p in processors_for(params)]
    assert kinds == ["RepetitionPenalty", "NoRepeatNGram", "Temperature", "TopK", "TopP", "MinP"]
    assert [type(p).__name__ for p in processors_for(SamplingParams(greedy=True, repetition_penalty=1.3))] == \
        ["RepetitionPenalty"]


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    history = History(torch.tensor([[0]]), n_prompt=0)
    assert int(sample_next(logits, SamplingParams(greedy=True))[0]) == 0
    assert int(sample_next(logits, SamplingParams(greedy=True, repetition_penalty=1.2), history=history)[0]) == 1
    assert int(sample_next(logits, SamplingParams(greedy=True, presence_penalty=0.2), history=history)[0]) == 1
    with pytest.raises(ValueError, match="History"):
        RepetitionPenalty(1.2)(logits, None)


@pytest.mark.parametrize("bad", [dict(min_p=1.5), dict(repetition_penalty=0.0), dict(frequency_penalty=3.0),
                                 dict(presence_penalty=-2.5), dict(no_repeat_ngram_size=-1)])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        SamplingParams(**bad)


# ----------------------------------------------------------------------------------------------
# in the engines


@pytest.fixture(scope="module")
def model() -> Transformer:
    return debug_model(32, 0, init_std=0.3)


def bigrams(seq: list[int]) -> list[tuple[int, int]]:
    return list(zip(seq, seq[1:], strict=False))


def test_engine_no_repeat_ngram_and_batch_agree(model):
    prompt = [3, 4, 5]
    plain = generate(model, prompt, SamplingParams(greedy=True, max_new_tokens=40))
    assert len(set(bigrams(prompt + plain))) < len(bigrams(prompt + plain))  # greedy repeats itself here
    params = SamplingParams(greedy=True, max_new_tokens=40, no_repeat_ngram_size=2, repetition_penalty=1.2,
                            frequency_penalty=0.3)
    out = generate(model, prompt, params)
    assert len(set(bigrams(prompt + out))) == len(bigrams(prompt + out)) and len(out) == 40
    # left-padded batch rows see exactly their own history
    prompts = [prompt, [9, 1], [7, 7, 7, 7, 2]]
    assert generate_batch(model, prompts, params) == [generate(model, p, params) for p in prompts]


# ----------------------------------------------------------------------------------------------
# presets


def test_presets_set_what_they_print():
    for name, settings in PRESETS.items():
        p = apply_preset(SamplingParams(), name)
        assert all(getattr(p, k) == v for k, v in settings.items())
        assert all(f"{k}={v}" in describe_preset(name) for k, v in settings.items())
    kept = apply_preset(SamplingParams(temperature=0.2), "creative", keep=frozenset({"temperature"}))
    assert kept.temperature == 0.2 and kept.min_p == 0.05
    assert apply_preset(SamplingParams(), "precise").is_greedy
    with pytest.raises(ConfigError, match="did you mean 'creative'"):
        apply_preset(SamplingParams(), "creativ")


def test_cli_preset_prints_settings_and_user_options_win(model, tmp_path, capsys):
    ckpt = save_model(model, tmp_path / "m")
    args = ["generate", "--checkpoint", str(ckpt), "--input-ids", "3 4 5", "--sampling.max-new-tokens", "8", "--json"]
    capsys.readouterr()
    assert main([*args, "--preset", "creative"]) == 0
    out = capsys.readouterr()
    assert "preset creative: greedy=False temperature=1.0" in out.err and "min_p=0.05" in out.err
    assert len(json.loads(out.out.strip().splitlines()[-1])["ids"]) == 8
    assert main([*args, "--preset", "precise", "--sampling.repetition-penalty", "1.5",
                 "--sampling.no-repeat-ngram-size", "2"]) == 0
    out = capsys.readouterr()
    assert "kept yours: repetition_penalty" in out.err
    expected = generate(model, [3, 4, 5], SamplingParams(greedy=True, repetition_penalty=1.5, no_repeat_ngram_size=2,
                                                         max_new_tokens=8))
    assert json.loads(out.out.strip().splitlines()[-1])["ids"] == expected
    assert main([*args, "--preset", "wild"]) != 0
    assert "unknown sampling preset 'wild'" in capsys.readouterr().err


def test_chat_settings_accept_penalties():
    from lmforge.generate.chat import apply_settings, describe

    p = apply_settings(SamplingParams(), "repetition_penalty=1.2 no_repeat_ngram_size=3 min_p=0.1")
    assert (p.repetition_penalty, p.no_repeat_ngram_size, p.min_p) == (1.2, 3, 0.1)
    assert describe(p).endswith("min_p=0.1 repetition_penalty=1.2 no_repeat_ngram_size=3")
    assert "penalty" not in describe(SamplingParams())
