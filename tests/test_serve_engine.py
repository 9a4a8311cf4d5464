"""The serving engine: prefix caching, batched and chunked prefill, multi-LoRA batches. Every case compares greedy
ids with the single-sequence engine (`lmforge.generate.engine.generate`) or with a merged model."""

from __future__ import annotations

import pytest
import torch
from schedjobs import job, run
from tinymodels import mha_model, text_tokenizer

from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.serve.cache import BLOCK
from lmforge.serve.scheduler import Job, Scheduler

ARCHS = [dict(n_kv_heads=2), dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8)]


def model_and_tok(seed: int = 5, **arch):
    tok = text_tokenizer()
    return mha_model(tok.vocab_size, seed=seed, init_std=0.2, max_seq_len=128, **arch), tok


def ids(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    return [generate(model, p, SamplingParams(greedy=True, max_new_tokens=n)) for p in prompts]


@pytest.mark.parametrize("arch", ARCHS, ids=["gqa", "mla"])
def test_prefix_cache_is_exact_and_prefills_only_new_tokens(arch):
    model, tok = model_and_tok(**arch)
    system = ids(2 * BLOCK + 7, 0, tok.vocab_size)  # two full blocks and a bit
    prompts = [system + ids(5 + i, 10 + i, tok.vocab_size) for i in range(3)]
    want = reference(model, prompts, 8)
    for prefix_cache in (False, True):
        scheduler = Scheduler(model, tok, max_batch=2, prefix_cache=prefix_cache)
        assert run(scheduler, [job(prompts[0], 8)]) == want[:1]
        before = scheduler.stats.prefill_tokens
        assert run(scheduler, [job(p, 8) for p in prompts[1:]]) == want[1:]
        new = scheduler.stats.prefill_tokens - before
        if prefix_cache:  # the two system-prompt blocks come from the cache
            assert new == sum(len(p) for p in prompts[1:]) - 2 * 2 * BLOCK
            assert scheduler.stats.cached_tokens == 2 * 2 * BLOCK
        else:
            assert new == sum(len(p) for p in prompts[1:]) and scheduler.stats.cached_tokens == 0


def test_requests_arriving_together_wait_for_the_prefix_one_of_them_computes():
    model, tok = model_and_tok()
    system = ids(3 * BLOCK + 2, 0, tok.vocab_size)
    prompts = [system + ids(4 + i, 20 + i, tok.vocab_size) for i in range(4)]
    scheduler = Scheduler(model, tok, max_batch=4, prefill_chunk=2 * BLOCK)
    assert run(scheduler, [job(p, 6) for p in prompts]) == reference(model, prompts, 6)
    assert scheduler.stats.cached_tokens == 3 * 3 * BLOCK  # the first computes the system prompt once
    assert scheduler.stats.prefill_tokens == sum(map(len, prompts)) - 3 * 3 * BLOCK


def test_prefix_cache_evicts_least_recently_used_blocks_and_stays_exact():
    model, tok = model_and_tok()
    prompts = [ids(3 * BLOCK + 1, s, tok.vocab_size) for s in range(4)]
    scheduler = Scheduler(model, tok, max_batch=1, prefix_blocks=4)  # room for one prompt's blocks and a bit
    assert run(scheduler, [job(p, 5) for p in prompts]) == reference(model, prompts, 5)
    assert len(scheduler.prefix.blocks) <= 4 and scheduler.stats.cached_tokens == 0
    assert run(scheduler, [job(prompts[-1], 5)]) == reference(model, prompts[-1:], 5)  # the newest survived
    assert scheduler.stats.cached_tokens == 3 * BLOCK


def test_prompt_of_whole_cached_blocks_still_runs_its_last_token():
    model, tok = model_and_tok()
    prompt = ids(2 * BLOCK, 3, tok.vocab_size)
    scheduler = Scheduler(model, tok, max_batch=2)
    want = reference(model, [prompt], 6)
    assert run(scheduler, [job(prompt, 6)]) == want and run(scheduler, [job(prompt, 6)]) == want
    assert scheduler.stats.cached_tokens == BLOCK  # the second block holds the token that must run


@pytest.mark.parametrize("arch", ARCHS, ids=["gqa", "mla"])
def test_new_requests_are_prefilled_together(arch):
    model, tok = model_and_tok(**arch)
    prompts = [ids(n, n, tok.vocab_size) for n in (3, 17, 9, 30)]
    scheduler = Scheduler(model, tok, max_batch=4, prefix_cache=False)
    assert run(scheduler, [job(p, 7) for p in prompts]) == reference(model, prompts, 7)
    assert scheduler.stats.prefill_steps == 1 and scheduler.stats.prefill_tokens == sum(map(len, prompts))


@pytest.mark.parametrize("arch", ARCHS, ids=["gqa", "mla"])
def test_chunked_prefill_is_exact_and_keeps_running_streams_decoding(arch):
    model, tok = model_and_tok(**arch)
    short, long = ids(4, 1, tok.vocab_size), ids(70, 2, tok.vocab_size)
    scheduler = Scheduler(model, tok, max_batch=3, prefill_chunk=8)
    running = job(short, 40)
    scheduler.submit(running)
    scheduler.step()
    arriving = job(long, 5)
    scheduler.submit(arriving)
    before = len(running.generated)
    while not arriving.generated:
        scheduler.step()
    # the 70-token prompt took 9 passes of <= 8 tokens, and the running stream got a token in each
    assert len(running.generated) - before == 9
    while scheduler.in_flight:
        scheduler.step()
    assert [running.generated, arriving.generated] == reference(model, [short, long], 40)[:1] + \
        reference(model, [long], 5)
    assert scheduler.stats.prefill_tokens == len(short) + len(long)


@pytest.mark.parametrize("arch", [dict(sliding_window=8), dict(position="alibi")], ids=["window", "alibi"])
def test_windowed_and_alibi_models_prefill_one_prompt_a_pass_and_stay_exact(arch):
    """Fails before this change too: rows decoded together ignored the window, and ALiBi measured distances
    from slot 0."""
    model, tok = model_and_tok(**arch)
    prompts = [ids(n, n, tok.vocab_size) for n in (13, 21, 30)]
    scheduler = Scheduler(model, tok, max_batch=3, prefill_chunk=10)
    got = run(scheduler, [job(p, 12) for p in prompts])
    assert scheduler.stats.prefill_steps == 8  # 2 + 3 + 3 chunks, never two prompts in one pass
    assert got == reference(model, prompts, 12)  # decode rows see their own last 8 keys / their own distances


def test_chunked_batched_prefill_with_echo_logprobs_scores_every_prompt_token():
    model, tok = model_and_tok()
    prompt = ids(21, 4, tok.vocab_size)
    events = []
    whole, chunked = Scheduler(model, tok, prefill_chunk=0), Scheduler(model, tok, prefill_chunk=5)
    for scheduler in (whole, chunked):
        j = Job(prompt, SamplingParams(greedy=True, max_new_tokens=2), events.append, logprobs=1, echo_logprobs=True)
        run(scheduler, [job(ids(9, 7, tok.vocab_size), 3), j])
    scored = [ev.entries for ev in events if hasattr(ev, "entries")]
    assert len(scored) == 2 and [e.token for e in scored[1]] == prompt
    assert [e.logprob for e in scored[0][1:]] == pytest.approx([e.logprob for e in scored[1][1:]], abs=1e-4)


def lora_dirs(tmp_path, tok):
    """A base checkpoint and two LoRA adapters on it (different ranks, targets and DoRA), with random B."""
    from tinymodels import save_checkpoint

    from lmforge.peft.io import save_adapter
    from lmforge.peft.lora import LoraConfig, apply_lora

    base, _ = model_and_tok(seed=9)
    save_checkpoint(base, tok, tmp_path / "base")
    configs = {"poet": LoraConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]),
               "critic": LoraConfig(r=2, alpha=8.0, targets=["o_proj", "up_proj", "lm_head"], dora=True)}
    for i, (name, cfg) in enumerate(configs.items()):
        model, _ = model_and_tok(seed=9)
        apply_lora(model, cfg, name)
        g = torch.Generator().manual_seed(i)
        for p_name, p in model.named_parameters():
            if "lora_B" in p_name or "lora_magnitude" in p_name:
                p.data += torch.randn(p.shape, generator=g) * 0.3
        save_adapter(model, tmp_path / name, cfg, name)
    return tmp_path / "base", {name: tmp_path / name for name in configs}


def test_multi_lora_batch_equals_each_merged_model(tmp_path):
    from lmforge.model import load_model
    from lmforge.peft.config import load_trained, merge_adapter
    from lmforge.serve.app import load_adapters

    tok = text_tokenizer()
    base_dir, adapters = lora_dirs(tmp_path, tok)
    model = load_model(base_dir)
    names = load_adapters(model, [f"{n}={d}" for n, d in adapters.items()])
    assert names == ("poet", "critic")
    prompts = [ids(n, n, tok.vocab_size) for n in (5, 19, 11, 8, 23, 14)]
    which = [None, "poet", "critic", "poet", "critic", None]
    scheduler = Scheduler(model, tok, max_batch=6, prefill_chunk=16)
    got = run(scheduler, [job(p, 9, adapter=a) for p, a in zip(prompts, which)])
    assert scheduler.stats.max_batch_seen == 6  # the three models decoded in one batch
    merged = {None: load_model(base_dir)} | {n: merge_adapter(load_trained(base_dir, d)) for n, d in adapters.items()}
    assert got == [reference(merged[a], [p], 9)[0] for p, a in zip(prompts, which)]
    assert len({tuple(g) for g in got[1:5]}) > 1  # the adapters do change the output
    # a prompt cached under one adapter is not reused by another (its keys differ)
    before = scheduler.stats.cached_tokens
    assert run(scheduler, [job(prompts[4], 9, adapter="poet")]) == reference(merged["poet"], prompts[4:5], 9)
    assert scheduler.stats.cached_tokens == before


def test_served_adapters_are_listed_routed_and_refused_by_name(tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from lmforge.core.errors import ConfigError
    from lmforge.model import load_model
    from lmforge.peft.config import load_trained, merge_adapter
    from lmforge.serve.app import BackgroundServer, ServeConfig, create_app, load_adapters

    tok = text_tokenizer()
    base_dir, adapters = lora_dirs(tmp_path, tok)
    model = load_model(base_dir)
    names = load_adapters(model, [f"{n}={d}" for n, d in adapters.items()])
    prompt = ids(2 * BLOCK + 8, 1, tok.vocab_size)
    with BackgroundServer(create_app(model, tok, "base", adapters=names)) as server:
        listed = httpx.get(server.url + "/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in listed] == [("base", None), ("poet", "base"), ("critic", "base")]
        out = httpx.post(server.url + "/v1/completions", json={"model": "critic", "prompt": prompt, "max_tokens": 6,
                                                               "temperature": 0, "ignore_eos": True}).json()
        want = reference(merge_adapter(load_trained(base_dir, adapters["critic"])), [prompt], 6)[0]
        assert out["model"] == "critic" and out["choices"][0]["text"] == tok.decode(want)
        missing = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "a", "max_tokens": 1})
        assert missing.status_code == 404 and "'poet'" in missing.json()["error"]["message"]
        health = httpx.get(server.url + "/health").json()
        assert health["prefill_tokens"] == len(prompt) and health["cached_tokens"] == 0
        longer = prompt + ids(5, 2, tok.vocab_size)  # a second turn: only what is new past the cached blocks runs
        again = httpx.post(server.url + "/v1/completions", json={"model": "critic", "prompt": longer, "max_tokens": 6,
                                                                 "temperature": 0, "ignore_eos": True}).json()
        want = reference(merge_adapter(load_trained(base_dir, adapters["critic"])), [longer], 6)[0]
        assert again["choices"][0]["text"] == tok.decode(want)
        health = httpx.get(server.url + "/health").json()
        assert health["cached_tokens"] == 2 * BLOCK
        assert health["prefill_tokens"] == len(prompt) + len(longer) - 2 * BLOCK
    for bad in (["poet"], ["a.b=dir"], ["x=d1", "x=d2"]):
        with pytest.raises(ConfigError, match="adapter"):
            ServeConfig(checkpoint="c", adapter=bad)
