"""Speculative decoding: greedy output identical to the target's, the accept/reject rule reproduces the
target distribution, acceptance rates, and `lmforge generate --draft`."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.speculative import MTPDrafter, SpecStats, speculative_generate, speculative_stream, verify
from lmforge.model import ModelConfig, Transformer, save_model

VOCAB = 64
PROMPT = [5, 17, 3, 42, 8]


def tiny(seed: int, **overrides) -> Transformer:
    cfg = from_dict(ModelConfig, {"preset": "debug", "vocab_size": VOCAB, "init_std": 0.3, **overrides})
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def target() -> Transformer:
    return tiny(0)


@pytest.fixture(scope="module")
def close_draft(target) -> Transformer:
    """The target with its weights perturbed a little: it agrees with the target often, not always."""
    draft = tiny(0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return draft


@pytest.mark.parametrize("num_draft", [1, 3, pytest.param(6, marks=pytest.mark.slow)])
@pytest.mark.parametrize("settings", [{}, dict(repetition_penalty=1.3, no_repeat_ngram_size=3)])
def test_greedy_speculative_equals_target_greedy(target, close_draft, num_draft, settings):
    params = SamplingParams(greedy=True, max_new_tokens=40, **settings)
    expected = generate(target, PROMPT, params)
    for draft in (close_draft, tiny(7, n_layers=1), target):
        out, stats = speculative_generate(target, draft, PROMPT, params, num_draft)
        assert out == expected
        assert stats.tokens == 40 and stats.target_calls + stats.accepted == 40
    _, stats = speculative_generate(target, target, PROMPT, params, num_draft)
    assert stats.acceptance_rate == 1.0 and stats.target_calls == -(-40 // (num_draft + 1))
    _, stats = speculative_generate(target, close_draft, PROMPT, params, num_draft)
    assert 0.1 < stats.acceptance_rate < 1.0


def test_greedy_speculative_respects_stop_token_and_context(target, close_draft):
    full = generate(target, PROMPT, SamplingParams(greedy=True, max_new_tokens=30))
    stop = full[9]
    params = SamplingParams(greedy=True, max_new_tokens=30, stop_token_ids=[stop])
    assert speculative_generate(target, close_draft, PROMPT, params, 4)[0] == full[:full.index(stop)]
    long_prompt = (PROMPT * 30)[:120]  # max_seq_len 128: 8 tokens of room
    params = SamplingParams(greedy=True, max_new_tokens=30)
    out = speculative_generate(target, close_draft, long_prompt, params, 4)[0]
    assert out == generate(target, long_prompt, params) and len(out) == 8


def test_accept_reject_rule_samples_the_target_distribution():
    """Leviathan et al. Theorem 1: whatever q is, the first emitted token is distributed as p."""
    p_logits = torch.tensor([[1.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q = torch.softmax(torch.tensor([[-1.0, 1.0, 0.5, 0.0]]), -1)
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    drafts = torch.multinomial(q[0], n, replacement=True, generator=gen).tolist()
    counts = torch.zeros(4)
    for x in drafts:
        counts[verify(p_logits, [x], q, [0], 1, params, gen)[0]] += 1
    assert torch.allclose(counts / n, torch.softmax(p_logits[0], -1), atol=0.015)


def test_sampling_speculative_is_seeded_and_differs_by_seed(target, close_draft):
    params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=30, seed=3)
    a, stats = speculative_generate(target, close_draft, PROMPT, params, 4)
    assert a == speculative_generate(target, close_draft, PROMPT, params, 4)[0] and len(a) == 30
    assert a != speculative_generate(target, close_draft, PROMPT, SamplingParams(temperature=1.0, top_k=20,
                                                                                max_new_tokens=30, seed=4), 4)[0]
    assert 0.0 < stats.acceptance_rate <= 1.0


def test_draft_with_other_vocabulary_is_refused(target):
    with pytest.raises(LmforgeError, match="vocab_size"):
        speculative_generate(target, tiny(0, vocab_size=VOCAB + 1), PROMPT, SamplingParams(greedy=True))


def test_cli_draft_reports_acceptance_rate(target, close_draft, tmp_path, capsys):
    t, d = save_model(target, tmp_path / "target"), save_model(close_draft, tmp_path / "draft")
    capsys.readouterr()
    code = main(["generate", "--checkpoint", str(t), "--draft", str(d), "--input-ids", " ".join(map(str, PROMPT)),
                 "--sampling.greedy", "true", "--sampling.max-new-tokens", "20", "--json"])
    assert code == 0
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["ids"] == generate(target, PROMPT, SamplingParams(greedy=True, max_new_tokens=20))
    assert 0 < result["acceptance_rate"] < 1
    assert "speculative decoding: acceptance rate" in out.err


def test_mtp_heads_as_drafter(tmp_path, capsys):
    target = tiny(0, mtp_depth=2)
    params = SamplingParams(greedy=True, max_new_tokens=30)
    stats = SpecStats()
    out = list(speculative_stream(target, MTPDrafter(target), PROMPT, params, 4, stats))
    assert out == generate(target, PROMPT, params)
    assert stats.proposed > 0 and max(stats.per_round) <= 2  # depth 2: at most 2 drafts a round
    with pytest.raises(LmforgeError, match="mtp_depth"):
        MTPDrafter(tiny(0))
    ckpt = save_model(target, tmp_path / "mtp")
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(ckpt), "--draft", "mtp", "--input-ids", "5 17 3",
                 "--sampling.greedy", "true", "--sampling.max-new-tokens", "12", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ids"] == generate(target, [5, 17, 3], SamplingParams(greedy=True, max_new_tokens=12))
