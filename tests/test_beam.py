"""Beam search and contrastive search on the KV cache against references without one, and from the CLI.
(HF parity of beam search: tests/test_hf_generate.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.generate.beam import BeamParams, beam_search
from lmforge.generate.contrastive import contrastive_search, degeneration_scores
from lmforge.generate.engine import RunStats, Strategy, generate, generate_stream
from lmforge.generate.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer, save_model

PROMPT = [5, 17, 3, 42, 8]


@pytest.fixture(scope="module")
def model() -> Transformer:
    cfg = from_dict(ModelConfig, {"preset": "debug", "vocab_size": 48, "init_std": 0.3})
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@torch.no_grad()
def logprob(model: Transformer, prompt: list[int], new: list[int]) -> float:
    seq = torch.tensor([prompt + new])
    lp = torch.log_softmax(model(seq)[0, :-1].float(), -1)
    return float(lp[torch.arange(len(prompt) - 1, seq.shape[1] - 1), seq[0, len(prompt):]].sum())


def test_one_beam_is_greedy(model):
    greedy = generate(model, PROMPT, SamplingParams(greedy=True, max_new_tokens=15))
    assert beam_search(model, PROMPT, BeamParams(num_beams=1, max_new_tokens=15))[0].tokens == greedy


def test_beam_scores_are_the_sequence_logprobs_and_beat_greedy(model):
    params = BeamParams(num_beams=4, max_new_tokens=12, length_penalty=0.0, num_return_sequences=4)
    hyps = beam_search(model, PROMPT, params)
    for h in hyps:  # scores from the reordered cache equal a full recompute of each hypothesis
        assert abs(h.score - logprob(model, PROMPT, h.tokens)) < 1e-3
    assert len({tuple(h.tokens) for h in hyps}) == 4
    greedy = generate(model, PROMPT, SamplingParams(greedy=True, max_new_tokens=12))
    assert hyps[0].score >= logprob(model, PROMPT, greedy) - 1e-4


def test_beam_params_checked():
    with pytest.raises(ConfigError, match="num_return_sequences"):
        BeamParams(num_beams=2, num_return_sequences=3)
    with pytest.raises(ConfigError, match="num_beams"):
        BeamParams(num_beams=0)


# ----------------------------------------------------------------------------------------------
# contrastive search


def test_degeneration_score_by_hand():
    probs = torch.tensor([0.6, 0.4])
    cand = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    context = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # candidate 0: max cos = 1 -> 0.5*0.6 - 0.5*1 = -0.2; candidate 1: max cos = 1/sqrt2 -> 0.2 - 0.354
    got = degeneration_scores(probs, cand, context, 0.5)
    assert torch.allclose(got, torch.tensor([-0.2, 0.2 - 0.5 / 2**0.5]))


@torch.no_grad()
def contrastive_reference(model: Transformer, prompt: list[int], alpha: float, k: int, n: int) -> list[int]:
    """Su et al. eq. 5 recomputed from scratch every step: no cache, one full forward per candidate."""
    seq = list(prompt)
    for _ in range(n):
        hidden = model(torch.tensor([seq]), return_hidden=True)[0]
        probs = torch.softmax(model.lm_head(hidden[-1]).float(), -1)
        top = torch.topk(probs, k)
        scores = []
        for p, v in zip(top.values, top.indices.tolist(), strict=True):
            h_v = model(torch.tensor([seq + [v]]), return_hidden=True)[0, -1]
            penalty = F.cosine_similarity(h_v[None], hidden, dim=-1).max()
            scores.append((1 - alpha) * p - alpha * penalty)
        seq.append(top.indices.tolist()[int(torch.stack(scores).argmax())])
    return seq[len(prompt):]


def test_contrastive_matches_reference_and_alpha_zero_is_greedy(model):
    got = contrastive_search(model, PROMPT, alpha=0.6, top_k=4, max_new_tokens=12)
    assert got == contrastive_reference(model, PROMPT, 0.6, 4, 12)
    greedy = generate(model, PROMPT, SamplingParams(greedy=True, max_new_tokens=12))
    assert got != greedy
    assert contrastive_search(model, PROMPT, alpha=0.0, top_k=4, max_new_tokens=12) == greedy


def test_contrastive_one_forward_per_token(model):
    fed: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(args[0].shape[1]),
                                             with_kwargs=True)
    try:
        contrastive_search(model, PROMPT, alpha=0.5, top_k=3, max_new_tokens=6)
    finally:
        handle.remove()
    assert fed == [len(PROMPT)] + [3] * 6  # prefill, then the k candidates in one pass per step


def test_one_entry_runs_every_strategy(model):
    """`generate(model, ids, strategy)` gives what each strategy's own function gives, for one or many prompts."""
    params = SamplingParams(greedy=True, max_new_tokens=10)
    greedy = generate(model, PROMPT, params)
    best = beam_search(model, PROMPT, BeamParams(num_beams=3, length_penalty=0.5, max_new_tokens=10))[0]
    stats = RunStats()
    assert list(generate_stream(model, PROMPT, Strategy("beam", params, num_beams=3, length_penalty=0.5),
                                stats)) == best.tokens
    assert stats.score == best.score
    contrastive = Strategy("contrastive", params, penalty_alpha=0.6)
    assert generate(model, PROMPT, contrastive) == contrastive_search(model, PROMPT, 0.6, 4, 10)
    assert generate(model, PROMPT, Strategy("speculative", params, draft=model)) == greedy  # exact when greedy
    short = generate(model, [9, 1], params)
    assert generate(model, [PROMPT, [9, 1]], params) == [greedy, short]  # one batch
    assert generate(model, [PROMPT, [9, 1]], Strategy("beam", params, num_beams=1)) == [greedy, short]


def test_cli_beam_and_contrastive(model, tmp_path, capsys):
    ckpt = save_model(model, tmp_path / "m")
    base = ["generate", "--checkpoint", str(ckpt), "--input-ids", " ".join(map(str, PROMPT)),
            "--sampling.max-new-tokens", "10", "--json"]
    capsys.readouterr()
    assert main([*base, "--num-beams", "3", "--length-penalty", "0.5", "--early-stopping", "never"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    best = beam_search(model, PROMPT, BeamParams(num_beams=3, length_penalty=0.5, early_stopping="never",
                                                 max_new_tokens=10))[0]
    assert out["ids"] == best.tokens and abs(out["score"] - best.score) < 1e-5
    assert main([*base, "--penalty-alpha", "0.6", "--sampling.top-k", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ids"] == contrastive_search(model, PROMPT, 0.6, 4, 10)
    assert main([*base, "--num-beams", "3", "--penalty-alpha", "0.5"]) != 0
    assert "choose one decoding strategy" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_strategies_with_virtual_tokens(method):
    """Prefix/prompt tuning put n virtual tokens in the first cache slots: every strategy must skip them."""
    from lmforge.generate.speculative import speculative_generate
    from lmforge.peft import PrefixConfig, PromptConfig, apply_prefix_tuning, apply_prompt_tuning

    cfg = from_dict(ModelConfig, {"preset": "debug", "vocab_size": 48, "init_std": 0.3})
    torch.manual_seed(0)
    tuned = Transformer(cfg).eval()
    if method == "prefix":
        apply_prefix_tuning(tuned, PrefixConfig(n_tokens=3), projection=False)
    else:
        apply_prompt_tuning(tuned, PromptConfig(n_tokens=3))
    with torch.no_grad():
        for p in tuned.virtual_tokens.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    tuned.eval()
    greedy = generate(tuned, PROMPT, SamplingParams(greedy=True, max_new_tokens=10))
    assert beam_search(tuned, PROMPT, BeamParams(num_beams=1, max_new_tokens=10))[0].tokens == greedy
    assert contrastive_search(tuned, PROMPT, 0.6, 3, 8) == contrastive_reference(tuned, PROMPT, 0.6, 3, 8)
    torch.manual_seed(0)
    draft = Transformer(cfg).eval()
    assert speculative_generate(tuned, draft, PROMPT, SamplingParams(greedy=True, max_new_tokens=10), 3)[0] == greedy
