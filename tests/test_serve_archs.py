"""Every architecture through `lmforge serve`: a prefix LM and encoder-decoders (T5 relative bias, and RoPE so
that rows of different sources share a pass) decoded by the continuous-batching scheduler, concurrent requests of
different lengths, greedy ids equal to `lmforge.generate.engine.generate` on the same checkpoint."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from schedjobs import run
from tinymodels import save_checkpoint, text_tokenizer

from lmforge.core.config import from_dict
from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import ModelConfig, load_model
from lmforge.model.encdec import build_model
from lmforge.serve.scheduler import Job, Scheduler
from lmforge.tokenizer import Tokenizer

ARCHS = {
    "prefix": dict(preset="debug", prefix_lm=True),
    "t5": dict(preset="t5-tiny", d_model=32, n_heads=4, n_layers=2, n_encoder_layers=2, d_ff=48),
    "encdec-rope": dict(preset="t5-tiny", d_model=32, n_heads=4, n_layers=2, n_encoder_layers=2, d_ff=48,
                        position="rope"),
}


def build(arch: str, vocab: int, **overrides):
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, {"vocab_size": vocab, "max_seq_len": 96, **ARCHS[arch],
                                                **overrides})).eval()
    with torch.no_grad():  # larger weights than the init, so that every path visibly moves the output
        for p in model.parameters():
            p.mul_(3.0)
    return model


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 23, 11, 2)]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_scheduler_decodes_every_architecture_as_generate_does(arch):
    tok = text_tokenizer()
    model = build(arch, tok.vocab_size)
    ps = prompts(tok.vocab_size)
    want = [generate(model, p, SamplingParams(greedy=True, max_new_tokens=6 + i)) for i, p in enumerate(ps)]
    scheduler = Scheduler(model, tok, max_batch=3, prefill_chunk=8)  # asks for the prefix cache and chunks
    assert scheduler.prefix is None and scheduler.prefix_cache_off  # off, and why
    jobs = [Job(p, SamplingParams(greedy=True, max_new_tokens=6 + i), lambda ev: None) for i, p in enumerate(ps)]
    assert run(scheduler, jobs) == want
    assert scheduler.stats.max_batch_seen == 3  # decoded together (T5 runs its rows one at a time)
    if arch == "prefix":  # whole prompts, never chunked
        assert scheduler.stats.prefill_tokens == sum(len(p) for p in ps)


def test_prefix_lm_is_served_bidirectionally_not_causally():
    tok = text_tokenizer()
    model, causal = build("prefix", tok.vocab_size), build("prefix", tok.vocab_size, prefix_lm=False)
    p = prompts(tok.vocab_size)[3]
    greedy = SamplingParams(greedy=True, max_new_tokens=8)
    got = run(Scheduler(model, tok, max_batch=2), [Job(p, greedy, lambda ev: None)])[0]
    assert got == generate(model, p, greedy) != generate(causal, p, greedy)


def test_encoder_decoder_refuses_prompt_logprobs():
    tok = text_tokenizer()
    scheduler = Scheduler(build("t5", tok.vocab_size), tok)
    with pytest.raises(Exception, match="encoder-decoder"):
        scheduler.submit(Job([5, 6, 7], SamplingParams(greedy=True, max_new_tokens=0), lambda ev: None,
                             echo_logprobs=True, logprobs=0))


@pytest.mark.parametrize("arch", ["prefix", "encdec-rope"])
def test_served_checkpoint_answers_concurrent_clients_as_generate_does(arch, tmp_path):
    """The oracle end to end: the `openai` SDK, concurrent completions of different lengths, on a saved checkpoint."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from lmforge.serve.app import BackgroundServer, create_app

    tok = text_tokenizer()
    save_checkpoint(build(arch, tok.vocab_size), tok, tmp_path)
    model, tok = load_model(tmp_path), Tokenizer.load(tmp_path)
    ps = prompts(tok.vocab_size)
    want = [tok.decode(generate(model, p, SamplingParams(greedy=True, max_new_tokens=5))) for p in ps]
    with BackgroundServer(create_app(model, tok, "m", max_batch=4)) as server:  # rows of every length at once
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.models.retrieve("m").model_extra["prefix_caching"] is False

        def ask(p: list[int]) -> str:
            return client.completions.create(model="m", prompt=p, max_tokens=5, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text

        with ThreadPoolExecutor(len(ps)) as pool:
            assert list(pool.map(ask, ps)) == want
