"""`lmforge serve`: the official openai client against an in-process server over a tiny random model.

The model is saved and loaded back as a checkpoint directory (what `lmforge serve` reads), and every
output the server gives is compared with `lmforge.generate.engine.generate` on the same prompt.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tinymodels import mha_model as tiny_model  # noqa: E402
from tinymodels import save_checkpoint  # noqa: E402
from tinymodels import text_tokenizer as tiny_tokenizer  # noqa: E402
from tinyserver import CONTEXT, NAME, greedy_reference, slow_steps  # noqa: E402

from lmforge.generate.engine import generate  # noqa: E402
from lmforge.generate.sampling import SamplingParams  # noqa: E402
from lmforge.generate.stops import StopMatcher  # noqa: E402
from lmforge.tokenizer.chat import prompt_ids, stop_token_ids  # noqa: E402


@pytest.fixture
def scheduler(served):
    return served[0].server.config.app.state.scheduler


def test_models_and_greedy_chat_equal_the_engine(served, client):
    _, model, tok = served
    assert [m.id for m in client.models.list().data] == [NAME]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a king?"}]
    out = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=10)
    ids = prompt_ids(tok, messages)
    want = greedy_reference(model, tok, ids, 10, stop_token_ids(tok))
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    assert out.object == "chat.completion" and out.model == NAME
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(tok.encode(want)) or out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_stream_equals_non_stream_and_ends_with_done(served, client):
    _, model, tok = served
    kw = dict(model=NAME, prompt="To be, or not", temperature=0, max_tokens=15, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 15
    ids = tok.sequence_start + tok.encode("To be, or not")
    assert whole.choices[0].text == greedy_reference(model, tok, ids, 15, [])
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 15 and chunks[-2].choices[0].finish_reason == "length"
    with httpx.stream("POST", served[0].url + "/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_seed_reproduces_sampling(client):
    kw = dict(model=NAME, prompt="Once", temperature=1.0, top_p=0.95, max_tokens=20, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw, seed=11).choices[0].text
    assert client.completions.create(**kw, seed=11).choices[0].text == a
    assert client.completions.create(**kw, seed=12).choices[0].text != a


def test_stop_strings_cut_the_text_streamed_or_not(client):
    kw = dict(model=NAME, prompt="The", temperature=0, max_tokens=30, extra_body={"ignore_eos": True})
    free = client.completions.create(**kw).choices[0].text
    stop = free[10:13]
    cut = free[:free.index(stop)]
    out = client.completions.create(**kw, stop=[stop, "never-appears"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True))
    assert streamed == cut


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END"])
    assert m.push("abc E") == "abc " and m.push("N") == "" and m.push("x") == "ENx"
    assert m.push("yyEN") == "yy" and m.push("D tail") == "" and m.stopped and m.flush() == ""
    m = StopMatcher(["xyz"])
    assert m.push("ab") == "ab" and m.push("x") == "" and m.flush() == "x"


def test_concurrent_requests_are_batched_and_equal_each_served_alone(served, client, scheduler):
    _, model, tok = served
    prompts = ["A", "Romeo and", "What light through yonder window", "Now is the winter", "My", "The king is dead,",
               "To", "Friends, Romans, countrymen"]

    def ask(i):  # different lengths and budgets: requests join and leave the batch at different steps
        out = client.completions.create(model=NAME, prompt=prompts[i], temperature=0, max_tokens=20 + 4 * i,
                                        extra_body={"ignore_eos": True})
        return out.choices[0].text

    alone = [ask(i) for i in range(len(prompts))]
    for i, text in enumerate(alone):
        assert text == greedy_reference(model, tok, tok.sequence_start + tok.encode(prompts[i]), 20 + 4 * i, [])
    scheduler.stats.max_batch_seen = 0
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, range(len(prompts))))
    assert together == alone
    assert scheduler.stats.max_batch_seen >= 4  # requests shared decode steps (not served one by one)


def test_bad_requests_get_openai_errors(served, client):
    url = served[0].url
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (b"{not json", 400, None),
        (dict(chat, model="gpt-4"), 404, "model"),
        (dict(chat, messages=[{"role": "user", "content": "word " * 400}]), 400, "messages"),
        (dict(chat, max_tokens=0), 400, "max_tokens"),
        (dict(chat, max_tokens=10**9), 400, "max_tokens"),
        (dict(chat, temperature=-0.5), 400, "temperature"),
        (dict(chat, top_p=0), 400, "top_p"),
        (dict(chat, top_p=1.5), 400, "top_p"),
        (dict(chat, temperature="hot"), 400, "temperature"),
        (dict(chat, messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.[0].role"),
        (dict(chat, messages=[]), 400, "messages"),
        (dict(chat, n=0), 400, "n"),
        ([1, 2], 400, None),
    ]
    for body, status, param in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(url + "/v1/chat/completions", content=data, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "word " * 400})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "128" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=chat["messages"])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=chat["messages"], temperature=-1)


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_too_many_concurrent_requests_get_429(served, client, scheduler):
    url = served[0].url
    long = {"model": NAME, "prompt": "x", "max_tokens": 100, "stream": True, "ignore_eos": True}
    old, scheduler.max_concurrent = scheduler.max_concurrent, 1
    try:
        with slow_steps(scheduler), httpx.stream("POST", url + "/v1/completions", json=long) as first:
            lines = first.iter_lines()  # keep the iterator: dropping it closes the connection
            next(lines)  # the first request is running
            r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "y"})
            assert r.status_code == 429 and "limit is 1" in r.json()["error"]["message"]
            assert r.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model=NAME, prompt="z")
    finally:
        scheduler.max_concurrent = old
    wait_until(lambda: scheduler.in_flight == 0)
    assert client.completions.create(model=NAME, prompt="y", max_tokens=3).usage.completion_tokens <= 3


def test_client_disconnect_mid_stream_frees_its_slot(served, scheduler):
    url = served[0].url
    before_cancelled, before_tokens = scheduler.stats.cancelled, scheduler.stats.tokens
    body = {"model": NAME, "messages": [{"role": "user", "content": "talk"}], "max_tokens": 120,
            "stream": True, "ignore_eos": True}
    with slow_steps(scheduler), httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert scheduler.in_flight == 1
    wait_until(lambda: scheduler.in_flight == 0)
    assert scheduler.stats.cancelled == before_cancelled + 1
    assert scheduler.stats.tokens - before_tokens < 120  # it stopped early: the slot was freed, not run out


def test_an_exception_in_one_request_fails_only_that_request(served, client, scheduler):
    _, model, tok = served
    sample = scheduler._sample

    def faulty(job, logits, greedy):
        if job.params.seed == 666:
            raise RuntimeError("boom")
        return sample(job, logits, greedy)

    scheduler._sample = faulty
    try:
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(client.completions.create, model=NAME, prompt="a", seed=666, max_tokens=5)
            good = pool.submit(client.completions.create, model=NAME, prompt="Romeo", temperature=0, max_tokens=12,
                               extra_body={"ignore_eos": True})
            with pytest.raises(openai.InternalServerError, match="boom"):
                bad.result()
            romeo = tok.sequence_start + tok.encode("Romeo")
            assert good.result().choices[0].text == greedy_reference(model, tok, romeo, 12, [])
        stream = client.completions.create(model=NAME, prompt="a", seed=666, max_tokens=5, stream=True)
        with pytest.raises(openai.APIError, match="boom"):
            list(stream)
    finally:
        del scheduler._sample
    assert client.completions.create(model=NAME, prompt="a", seed=666, max_tokens=5).usage.completion_tokens >= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_end_to_end(tmp_path):
    tok = tiny_tokenizer()
    save_checkpoint(tiny_model(tok.vocab_size, seed=3, max_seq_len=CONTEXT), tok, tmp_path / "ckpt")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--checkpoint", str(tmp_path / "ckpt"),
                             "--port", str(port), "--max-batch", "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert "serving 'ckpt'" in proc.stdout.readline()
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert r.json()["data"][0]["id"] == "ckpt"
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "chat.js" in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/static/chat.js").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)



@pytest.mark.parametrize("arch", [dict(n_kv_heads=2), dict(position="learned"),
                                  dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8)])
def test_scheduler_rows_equal_single_sequence_generate(arch):
    """Jobs joining and leaving between steps (per-row lengths, compaction) for GQA, learned positions and
    MLA's latent cache: each job's greedy tokens equal the single-sequence engine's."""
    from lmforge.serve.scheduler import Delta, Done, Job, Scheduler

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, seed=5, init_std=0.2, max_seq_len=64, **arch)
    scheduler = Scheduler(model, tok, max_batch=3)
    prompts = [tok.encode(t) for t in ["Romeo", "What light", "A", "Now is the winter of", "My lord", "To be"]]
    budgets = [9, 4, 14, 6, 11, 60]  # the last one runs into the 64-token context
    texts = [[] for _ in prompts]
    ends: dict[int, Done] = {}

    def emit(i):
        return lambda ev: texts[i].append(ev.text) if isinstance(ev, Delta) else ends.__setitem__(i, ev)

    for i, (p, n) in enumerate(zip(prompts, budgets)):
        scheduler.submit(Job(p, SamplingParams(greedy=True, max_new_tokens=n), emit(i)))
    while scheduler.in_flight:
        scheduler.step()
    assert scheduler.stats.max_batch_seen == 3
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        want = generate(model, p, SamplingParams(greedy=True, max_new_tokens=n))
        assert "".join(texts[i]) == tok.decode(want) and ends[i].completion_tokens == len(want) == min(n, 64 - len(p))
        assert ends[i].finish_reason == "length"
