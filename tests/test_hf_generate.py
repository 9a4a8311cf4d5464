"""Token-for-token parity with HF transformers `generate` on a tiny LLaMA exported from lmforge:
greedy (with penalties and the n-gram ban) and beam search (width, length penalty, early stopping,
no-repeat-n-gram); and each processor against HF's own logits processor on random logits.
(Contrastive and diverse beam search left transformers core in 4.56 for Hub `custom_generate`
repos, which need a download: contrastive search is checked in tests/test_beam.py instead.)"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as hf_lp  # noqa: E402

from lmforge.core.config import from_dict  # noqa: E402
from lmforge.generate.beam import BeamParams, beam_search  # noqa: E402
from lmforge.generate.engine import generate  # noqa: E402
from lmforge.generate.processors import (  # noqa: E402
    History,
    min_p_filter,
    no_repeat_ngram,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
)
from lmforge.generate.sampling import SamplingParams  # noqa: E402
from lmforge.model import ModelConfig, Transformer, save_model  # noqa: E402
from lmforge.model.hf.convert import to_hf  # noqa: E402

VOCAB = 64
PROMPT = [5, 17, 3, 42, 8]
NEW = 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cfg = from_dict(ModelConfig, {"preset": "debug", "vocab_size": VOCAB, "init_std": 0.3})
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    root = tmp_path_factory.mktemp("hfgen")
    hf_dir = to_hf(save_model(ours, root / "ours"), root / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    return ours, hf


@pytest.fixture(scope="module")
def eos(models) -> int:
    """A stop token the model produces a few steps in, so hypotheses end at different lengths."""
    return generate(models[0], PROMPT, SamplingParams(greedy=True, max_new_tokens=NEW))[3]


def hf_new_tokens(hf, eos: int | None = None, **kwargs) -> list[list[int]]:
    x = torch.tensor([PROMPT])
    extra = {} if eos is None else dict(eos_token_id=eos, pad_token_id=eos)
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW, **extra,
                          **kwargs)
    rows = [row[len(PROMPT):] for row in out.tolist()]
    return [r[:r.index(eos)] if eos is not None and eos in r else r for r in rows]


@pytest.mark.parametrize("settings", [{}, dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2),
                                      dict(repetition_penalty=0.8, no_repeat_ngram_size=3)])
def test_greedy_matches_hf(models, settings):
    ours, hf = models
    expected = hf_new_tokens(hf, **settings)[0]
    assert generate(ours, PROMPT, SamplingParams(greedy=True, max_new_tokens=NEW, **settings)) == expected


BEAMS = [
    dict(num_beams=3, length_penalty=1.0, early_stopping=False),
    dict(num_beams=4, length_penalty=2.0, early_stopping=True),
    dict(num_beams=4, length_penalty=-1.0, early_stopping="never", no_repeat_ngram_size=2),
    dict(num_beams=2, length_penalty=0.5, early_stopping=False, no_repeat_ngram_size=3),
    dict(num_beams=5, length_penalty=1.0, early_stopping="never"),
]


@pytest.mark.parametrize("settings", BEAMS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_beam_search_matches_hf(models, eos, settings):
    ours, hf = models
    K = settings["num_beams"]
    expected = hf_new_tokens(hf, eos, num_return_sequences=K, **settings)
    got = beam_search(ours, PROMPT, BeamParams(max_new_tokens=NEW, stop_token_ids=[eos], num_return_sequences=K,
                                               **settings))
    assert [h.tokens for h in got] == expected
    assert [h.score for h in got] == sorted((h.score for h in got), reverse=True)


def test_beam_hypotheses_end_at_different_lengths(models, eos):
    got = beam_search(models[0], PROMPT, BeamParams(num_beams=4, max_new_tokens=NEW, stop_token_ids=[eos],
                                                    num_return_sequences=4))
    assert any(len(h.tokens) < NEW for h in got)  # the stop token really ended some, so the test is not vacuous


def test_processors_match_hf_logits_processors():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, VOCAB, generator=gen) * 3
    ids = torch.randint(0, VOCAB, (3, 12), generator=gen)
    ids[:, 10:12] = ids[:, 2:4]  # the last two tokens occurred before: the 3-gram ban must fire
    history = History(ids, n_prompt=12)
    pairs = [
        (top_k_filter(logits, 7), hf_lp.TopKLogitsWarper(7)(ids, logits.clone())),
        (top_p_filter(logits, 0.8), hf_lp.TopPLogitsWarper(0.8)(ids, logits.clone())),
        (min_p_filter(logits, 0.1), hf_lp.MinPLogitsWarper(0.1)(ids, logits.clone())),
        (repetition_penalty(logits, history, 1.7), hf_lp.RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())),
        (no_repeat_ngram(logits, history, 3), hf_lp.NoRepeatNGramLogitsProcessor(3)(ids, logits.clone())),
    ]
    for ours, theirs in pairs:
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        assert torch.allclose(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])
    assert torch.isinf(pairs[-1][0]).any()  # the n-gram ban fired
