"""Every architecture the project trains (LLaMA-style decoder, MLA, prefix LM, T5 encoder-decoder) through the one
generation entry, `lmforge generate`, the chat session and the eval harness, each checked against decoding by
recomputing the whole sequence; serve's startup refusal; top-k/top-p ties and dynamic-NTK RoPE against
transformers."""

from __future__ import annotations

import json

import pytest
import torch
from textdata import SHAKESPEARE

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.eval.harness import evaluate_task, loglikelihoods
from lmforge.eval.make_tasks import write_task
from lmforge.eval.tasks import load_task
from lmforge.generate.chat import ChatSession
from lmforge.generate.contrastive import degeneration_scores
from lmforge.generate.engine import RunStats, Strategy, generate, generate_stream
from lmforge.generate.processors import top_k_filter, top_p_filter
from lmforge.generate.sampling import SamplingParams, filtered_logits, sample_next
from lmforge.model import ModelConfig, save_model
from lmforge.model.encdec import EncoderDecoder, build_model
from lmforge.model.hf.convert import from_hf
from lmforge.model.io import load_model
from lmforge.peft import PromptConfig, apply_prompt_tuning
from lmforge.tokenizer.chat import prompt_ids, stop_token_ids
from lmforge.tokenizer.train import train_bpe

VOCAB = 300
ARCHS = {
    "llama": dict(preset="debug"),
    "mla": dict(d_model=32, n_layers=2, n_heads=4, attention="mla", kv_lora_rank=16, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=12),
    "prefix": dict(preset="debug", prefix_lm=True),
    "t5": dict(preset="t5-tiny", d_model=32, n_heads=4, n_layers=2, n_encoder_layers=2, d_ff=48),
}
GREEDY = SamplingParams(greedy=True, max_new_tokens=6)


def build(arch: str, vocab: int = VOCAB, **overrides):
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"vocab_size": vocab, "max_seq_len": 64, **ARCHS[arch], **overrides})
    model = build_model(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so that every path visibly moves the output
        for p in model.parameters():
            p.mul_(3.0)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request):
    return build(request.param)


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def full(model, prompt: list[int], seq: list[int], hidden: bool = False) -> torch.Tensor:
    """Logits (or hidden states) of every position, recomputing the whole sequence without a cache: an
    encoder-decoder reads the prompt as its source, a prefix LM as its bidirectional prefix."""
    if isinstance(model, EncoderDecoder):
        return model(torch.tensor([prompt]), torch.tensor([[model.cfg.decoder_start_id] + seq]),
                     return_hidden=hidden)[0]
    prefix = torch.tensor([len(prompt)]) if model.cfg.prefix_lm else None
    return model(torch.tensor([prompt + seq]), prefix_len=prefix, return_hidden=hidden)[0]


def reference_sample(model, prompt: list[int], params: SamplingParams) -> list[int]:
    generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    seq: list[int] = []
    for _ in range(params.max_new_tokens):
        seq.append(int(sample_next(full(model, prompt, seq)[-1:], params, generator)[0]))
    return seq


def reference_contrastive(model, prompt: list[int], alpha: float, k: int, n: int) -> list[int]:
    """Su et al. (2022) eq. 5 by brute force: one full forward per candidate."""
    seq: list[int] = []
    for _ in range(n):
        context = full(model, prompt, seq, hidden=True)
        top = torch.topk(torch.softmax(model.lm_head(context[-1]).float(), -1), k)
        cand = torch.stack([full(model, prompt, seq + [int(v)], hidden=True)[-1] for v in top.indices])
        seq.append(int(top.indices[int(torch.argmax(degeneration_scores(top.values, cand, context, alpha)))]))
    return seq


# ------------------------------------------------------------------------------------------------------------
# the engine, every strategy


def test_greedy_and_seeded_sampling_equal_recomputing(model):
    p = prompt(7)
    assert generate(model, p, GREEDY) == reference_sample(model, p, GREEDY)
    sampled = SamplingParams(temperature=0.9, top_k=20, max_new_tokens=6, seed=3)
    assert generate(model, p, sampled) == reference_sample(model, p, sampled)


def test_prefix_lm_decodes_its_prompt_as_the_prefix():
    m, p = build("prefix"), prompt(7)
    causal = build("prefix", prefix_lm=False)  # the same weights read causally decode something else
    assert generate(m, p, GREEDY) != generate(causal, p, GREEDY)


def test_prefix_lm_with_prompt_tuning_keeps_the_whole_prompt_in_the_prefix():
    m, p = build("prefix"), prompt(7)
    apply_prompt_tuning(m, PromptConfig(n_tokens=3))
    with torch.no_grad():
        last = p[:-1] + [(p[-1] + 1) % VOCAB]
        first = [m(torch.tensor([q]), prefix_len=torch.tensor([len(q)]))[0, 0] for q in (p, last)]
    assert not torch.allclose(*first, atol=1e-4)  # the first prompt token sees the last one, as without tuning
    assert generate(m, p, GREEDY) == reference_sample(m, p, GREEDY)


def test_a_batch_equals_one_by_one(model):
    prompts = [prompt(9, 1), prompt(4, 2), prompt(6, 3)]  # padded: left for decoders, the sources for T5
    assert generate(model, prompts, GREEDY) == [generate(model, p, GREEDY) for p in prompts]


def test_beam_score_is_the_recomputed_log_probability(model):
    p, stats = prompt(7), RunStats()
    tokens = list(generate_stream(model, p, Strategy("beam", GREEDY, num_beams=3), stats))
    assert len(tokens) == GREEDY.max_new_tokens
    logp = torch.log_softmax(full(model, p, tokens[:-1]).float(), -1)[-len(tokens):]
    total = sum(float(logp[i, t]) for i, t in enumerate(tokens))
    assert stats.score == pytest.approx(total / len(tokens), abs=1e-4)
    assert generate(model, p, Strategy("beam", GREEDY, num_beams=1)) == generate(model, p, GREEDY)


def test_contrastive_equals_brute_force(model):
    p = prompt(7)
    got = generate(model, p, Strategy("contrastive", GREEDY, penalty_alpha=0.6))
    assert got == reference_contrastive(model, p, 0.6, 4, GREEDY.max_new_tokens)


def test_speculative_refuses_what_it_cannot_verify():
    for arch, kind in (("prefix", "a prefix LM"), ("t5", "an encoder-decoder")):
        with pytest.raises(LmforgeError, match=f"speculative decoding needs a causal decoder-only model; this one "
                                               f"is {kind}"):
            generate(build(arch), prompt(5), Strategy("speculative", GREEDY))


# ------------------------------------------------------------------------------------------------------------
# `lmforge generate`, chat, eval, serve


@pytest.mark.parametrize("flags,strategy", [
    ([], Strategy(sampling=GREEDY)),
    (["--num-beams", "2"], Strategy("beam", GREEDY, num_beams=2)),
    (["--penalty-alpha", "0.5"], Strategy("contrastive", GREEDY, penalty_alpha=0.5)),
])
def test_generate_command(tmp_path, model, capsys, flags, strategy):
    save_model(model, tmp_path / "m")
    p = prompt(6)
    rc = main(["generate", "--checkpoint", str(tmp_path / "m"), "--input-ids", " ".join(map(str, p)), "--json",
               "--sampling.greedy", "--sampling.max-new-tokens", "6", "--device", "cpu", *flags])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out.strip().splitlines()[-1])["ids"] == generate(model, p, strategy)


def test_generate_command_refusal_is_one_line(tmp_path, capsys):
    save_model(build("t5"), tmp_path / "t5")
    rc = main(["generate", "--checkpoint", str(tmp_path / "t5"), "--input-ids", "5 6 7", "--draft", "mtp",
               "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.count("\n") == 0 and "an encoder-decoder" in err and "Traceback" not in err


def test_a_prefix_lm_is_not_exported_to_hf(tmp_path, capsys):
    save_model(build("prefix"), tmp_path / "m")
    assert main(["convert", "to-hf", str(tmp_path / "m"), str(tmp_path / "hf")]) != 0
    assert "model.prefix_lm=true cannot be exported" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([SHAKESPEARE.read_text(encoding="utf-8")[:60_000]], vocab_size=VOCAB, show_progress=False)


def test_chat_session_answers_as_the_engine_decodes(model, tokenizer):
    session = ChatSession(model, tokenizer, SamplingParams(greedy=True, max_new_tokens=8))
    pieces: list[str] = []
    answer = session.reply("Who is there?", pieces.append)
    ids = generate(model, prompt_ids(tokenizer, [{"role": "user", "content": "Who is there?"}]),
                   SamplingParams(greedy=True, max_new_tokens=8, stop_token_ids=stop_token_ids(tokenizer)))
    assert answer == "".join(pieces) == tokenizer.decode(ids)
    session.reply("And then?", pieces.append)  # a second turn reads the whole history
    assert len(session.messages) == 4


def test_loglikelihoods_equal_recomputing(model):
    g = torch.Generator().manual_seed(1)
    requests = [(torch.randint(3, VOCAB, (n,), generator=g).tolist(),
                 torch.randint(3, VOCAB, (m,), generator=g).tolist()) for n, m in [(5, 3), (20, 1), (9, 7), (2, 2)]]
    for (ctx, cont), (ll, greedy) in zip(requests, loglikelihoods(model, requests, batch_size=3)):
        logp = torch.log_softmax(full(model, ctx, cont[:-1]).float(), -1)[-len(cont):]
        assert ll == pytest.approx(sum(float(logp[i, t]) for i, t in enumerate(cont)), abs=1e-4)
        assert greedy == all(int(logp[i].argmax()) == t for i, t in enumerate(cont))


def test_eval_tasks_run_on_every_architecture(tmp_path, model, tokenizer):
    rows = [{"q": f"Question {i}: who is", "a": "king"} for i in range(3)]
    gen = write_task(tmp_path / "gen", {"name": "gen", "type": "generate", "prompt": "{q}", "answer": "a",
                                        "max_new_tokens": 4}, rows)
    result = evaluate_task(model, tokenizer, load_task(gen), batch_size=2)
    assert result["n"] == 3
    mc_rows = [{"context": "The king is", "choices": ["dead", "alive"], "answer": 1}]
    mc = write_task(tmp_path / "mc", {"name": "mc", "type": "multiple_choice", "prompt": "{context}"}, mc_rows)
    assert len(evaluate_task(model, tokenizer, load_task(mc))["examples"][0]["logliks"]) == 2


# ------------------------------------------------------------------------------------------------------------
# decoding details against transformers


def test_top_k_and_top_p_ties_equal_transformers():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5, 3.0, 3.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    for k in range(1, 6):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits.clone())), k
    for p in (0.1, 0.3, 0.5, 0.6, 0.8, 0.95):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits.clone())), p
    hf = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(3), TopPLogitsWarper(0.8)])
    ours = filtered_logits(logits, SamplingParams(temperature=0.7, top_k=3, top_p=0.8))
    assert torch.equal(ours, hf(None, logits.clone()))


def dynamic_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_model(from_hf(tmp_path / "hf", tmp_path / "ours"))


def test_dynamic_ntk_from_hf_runs_past_the_original_context(tmp_path):
    hf, ours = dynamic_llama(tmp_path)
    assert (ours.cfg.rope_original_max_seq_len, ours.cfg.max_seq_len) == (32, 64)
    ids = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n in (50, 40, 20, 60):  # grow, stay within the grown table, back inside 32, grow again
            torch.testing.assert_close(ours(ids.repeat(1, 2)[:, :n]), hf(ids.repeat(1, 2)[:, :n]).logits,
                                       rtol=0, atol=1e-4)
        hf_ids = hf.generate(ids[:, :30], max_new_tokens=8, do_sample=False)[0, 30:].tolist()
    assert generate(ours, ids[0, :30].tolist(), SamplingParams(greedy=True, max_new_tokens=8)) == hf_ids


def test_dynamic_ntk_tables_are_recomputed_only_when_they_grow(monkeypatch):
    import lmforge.model.positions as positions

    rope = positions.RotaryEmbedding(from_dict(ModelConfig, {"preset": "debug", "max_seq_len": 64,
                                                             "rope_scaling": "dynamic", "rope_factor": 2.0,
                                                             "rope_original_max_seq_len": 32}))
    calls = []
    real = positions.scaled_rope_frequencies
    monkeypatch.setattr(positions, "scaled_rope_frequencies", lambda *a: calls.append(a[1:]) or real(*a))
    long = rope(torch.arange(50))
    for n in (40, 45, 50):
        rope(torch.arange(n))
    assert calls == [(50,)]  # once, for the longest length; shorter calls past 32 read that table
    torch.testing.assert_close(rope(torch.arange(40))[0], long[0][..., :40, :])
