"""`lmforge serve` under abuse: oversized bodies, a stalled tokenizer, cross-site browsers, DNS rebinding,
missing API keys, half-sent requests (slowloris), and a strictly sequential client at --max-concurrent 1.

Each test talks HTTP to a real uvicorn server (in a thread) over a tiny random model.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tinymodels import mha_model, text_tokenizer  # noqa: E402
from tinyserver import slow_steps  # noqa: E402

from lmforge.core.errors import ConfigError  # noqa: E402
from lmforge.generate.sampling import SamplingParams  # noqa: E402
from lmforge.serve.app import BackgroundServer, ServeConfig, create_app, policy_of  # noqa: E402
from lmforge.serve.scheduler import Done, Job, Scheduler, SchedulerBusy  # noqa: E402
from lmforge.serve.security import Policy  # noqa: E402

NAME = "tiny"
COMPLETION = {"model": NAME, "prompt": "Romeo", "max_tokens": 2}


@pytest.fixture(scope="module")
def parts():
    tok = text_tokenizer()
    return mha_model(tok.vocab_size, seed=3, init_std=0.2, max_seq_len=128), tok


@contextmanager
def serving(parts, policy: Policy | None = None, max_concurrent: int = 16, **timeouts):
    model, tok = parts
    with BackgroundServer(create_app(model, tok, NAME, max_batch=4, max_concurrent=max_concurrent, policy=policy),
                          **timeouts) as server:
        yield server


def post(url: str, body: dict | bytes, **headers: str) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url, content=data, headers={"Content-Type": "application/json", **headers}, timeout=30)


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]


# -- issue 16: the finished job is not in flight ----------------------------------------------------------


def test_a_finished_job_stops_counting_before_its_answer_is_sent(parts):
    """The client reacting to the answer (here: inside the event callback) may submit its next request."""
    model, tok = parts
    scheduler = Scheduler(model, tok, max_batch=2, max_concurrent=1)
    answers, refused = [], []

    def emit(event):
        if isinstance(event, Done):
            answers.append(event)
            try:
                if len(answers) < 3:
                    scheduler.submit(Job([1, 2, 3], SamplingParams(greedy=True, max_new_tokens=2), emit))
            except SchedulerBusy as e:
                refused.append(e)

    scheduler.submit(Job([1, 2, 3], SamplingParams(greedy=True, max_new_tokens=2), emit))
    for _ in range(20):
        scheduler.step()
    assert not refused and len(answers) == 3 and scheduler.in_flight == 0
    assert not scheduler.running and not scheduler.waiting


def test_sequential_requests_at_max_concurrent_1_are_never_refused(parts, monkeypatch):
    with serving(parts, max_concurrent=1) as server, httpx.Client(timeout=30) as client:
        scheduler = server.server.config.app.state.scheduler
        remove = scheduler._remove_finished

        def busy_remove():  # the loop has more to do after a job's last event (e.g. other rows to sample)
            time.sleep(0.05)
            remove()

        monkeypatch.setattr(scheduler, "_remove_finished", busy_remove)
        statuses = [client.post(server.url + "/v1/completions", json=COMPLETION).status_code for _ in range(20)]
        assert statuses == [200] * 20, statuses
        monkeypatch.undo()
        with slow_steps(scheduler, 0.02), ThreadPoolExecutor(2) as pool:  # the limit itself still holds
            long = dict(COMPLETION, max_tokens=60, ignore_eos=True)
            codes = sorted(pool.map(lambda b: client.post(server.url + "/v1/completions", json=b).status_code,
                                    [long, long]))
        assert codes == [200, 429]


# -- body size and the event loop ---------------------------------------------------------------------------


def test_an_oversized_body_gets_413_before_it_is_read(parts):
    with serving(parts, Policy(max_body_bytes=10_000)) as server:
        url = server.url + "/v1/completions"
        big = dict(COMPLETION, prompt="x" * 10_000)
        assert_error(post(url, big), 413, "request_too_large")
        chunks = (b"x" * 1000 for _ in range(50))  # no Content-Length: counted while it arrives
        r = httpx.post(url, content=chunks, headers={"Content-Type": "application/json"}, timeout=30)
        assert_error(r, 413, "request_too_large")
        assert post(url, dict(COMPLETION, prompt="x" * 100)).status_code == 200
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.APIStatusError, match="10000 bytes") as e:
            client.completions.create(model=NAME, prompt="y" * 20_000)
        assert e.value.status_code == 413
        assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_health_answers_while_a_prompt_is_being_tokenized(parts, monkeypatch):
    """Parsing and tokenizing run in a worker thread: the event loop serves /health meanwhile."""
    tok = parts[1]
    encode, started, release = tok.encode, threading.Event(), threading.Event()

    def slow_encode(*args, **kwargs):
        started.set()
        release.wait(20)
        return encode(*args, **kwargs)

    with serving(parts) as server, ThreadPoolExecutor(1) as pool:
        monkeypatch.setattr(tok, "encode", slow_encode)
        try:
            pending = pool.submit(post, server.url + "/v1/completions", COMPLETION)
            assert started.wait(10)
            assert httpx.get(server.url + "/health", timeout=3).status_code == 200
        finally:
            release.set()
        assert pending.result().status_code == 200


def ticks_per_second(work):
    """How often another Python thread gets to run (about every ms when free) while `work()` runs."""
    ticks, done = [0], threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    done.set()
    counter.join()
    return result, ticks[0] / seconds


def test_long_text_is_tokenized_without_holding_the_gil(parts):
    """The tokenizer's long-text path lets other Python threads run (the event loop, in the server)."""
    tok = parts[1]
    text = "What light through yonder window breaks? " * 10_000
    held, held_rate = ticks_per_second(lambda: tok.tk.encode(text, add_special_tokens=False).ids)
    ids, rate = ticks_per_second(lambda: tok.encode(text))
    assert ids == held
    assert rate > 5 * held_rate + 20, (rate, held_rate)


# -- who may call: API key, Host, Origin, Content-Type ------------------------------------------------------


def test_api_key_is_required_on_the_api_only(parts):
    with serving(parts, Policy(api_key="s3cret")) as server:
        url = server.url
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == [NAME]
        assert good.completions.create(model=NAME, prompt="Romeo", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        r = post(url + "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
        assert_error(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(httpx.get(url + "/v1/models", headers={"Authorization": "Basic s3cret"}), 401, "invalid_api_key")
        assert httpx.get(url + "/health").status_code == 200  # the page and health stay open
        page = httpx.get(url + "/")
        assert page.status_code == 200 and 'id="api-key"' in page.text and page.headers["x-frame-options"] == "DENY"


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    assert policy_of(ServeConfig(checkpoint="c")).api_key == ""
    monkeypatch.setenv("LMFORGE_API_KEY", "from-env")
    assert policy_of(ServeConfig(checkpoint="c")).api_key == "from-env"
    assert policy_of(ServeConfig(checkpoint="c", api_key="flag")).api_key == "flag"
    policy = policy_of(ServeConfig(checkpoint="c", host="0.0.0.0", allowed_hosts=["box.lan"], max_body_bytes=9))
    assert (policy.bound_host, policy.allowed_hosts, policy.max_body_bytes) == ("0.0.0.0", ("box.lan",), 9)
    for bad in (dict(port=99999), dict(max_body_bytes=0), dict(read_timeout=0), dict(keep_alive_timeout=-1)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ServeConfig(checkpoint="c", **bad)


def test_cross_site_requests_and_foreign_hosts_are_refused(parts):
    with serving(parts, Policy(allowed_hosts=("chat.example.org",))) as server:
        url, port = server.url, server.port
        scheduler = server.server.config.app.state.scheduler
        before = scheduler.stats.completed
        # a cross-site form or text/plain fetch (no CORS preflight) carrying JSON
        r = httpx.post(url + "/v1/completions", content=json.dumps(COMPLETION), headers={"Content-Type": "text/plain"})
        assert_error(r, 415, "unsupported_media_type")
        assert_error(httpx.post(url + "/v1/completions", data={"model": NAME}), 415, "unsupported_media_type")
        assert_error(post(url + "/v1/completions", COMPLETION, Origin="https://evil.example"), 403, "cross_origin")
        assert_error(httpx.get(url + "/v1/models", headers={"Origin": "null"}), 403, "cross_origin")
        assert_error(httpx.get(url + "/v1/models", headers={"Origin": f"http://localhost:{port + 1}"}), 403,
                     "cross_origin")
        # DNS rebinding: the attacker's name resolves to 127.0.0.1, the browser sends it as Host
        assert_error(httpx.get(url + "/v1/models", headers={"Host": f"rebind.evil.example:{port}"}), 400,
                     "invalid_host")
        assert_error(httpx.get(url + "/", headers={"Host": "rebind.evil.example"}), 400, "invalid_host")
        assert scheduler.stats.completed == before  # none of them reached the model
        # the chat page's own requests, other loopback names and the allowed name pass
        assert post(url + "/v1/completions", COMPLETION, Origin=url).status_code == 200
        for host in (f"localhost:{port}", f"[::1]:{port}", "127.0.0.1", "Chat.Example.org"):
            assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host
        r = post(url + "/v1/completions", COMPLETION, Host="chat.example.org", Origin="https://chat.example.org")
        assert r.status_code == 200  # behind a TLS proxy that keeps the Host header
        r = post(url + "/v1/completions", COMPLETION, Origin=url, **{"Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200


@pytest.mark.parametrize("host, bound, allowed, ok", [
    ("localhost:8000", "127.0.0.1", (), True),
    ("evil.example:8000", "127.0.0.1", (), False),
    ("10.1.2.3:8000", "127.0.0.1", (), False),
    ("10.1.2.3:8000", "0.0.0.0", (), True),  # every interface: reachable by its addresses
    ("[fe80::1]:8000", "::", (), True),
    ("box.lan:8000", "0.0.0.0", (), False),
    ("box.lan:8000", "0.0.0.0", ("box.lan",), True),
    ("anything:1", "127.0.0.1", ("*",), True),
    ("gpu-1:8000", "gpu-1", (), True),
    ("a b", "127.0.0.1", ("*",), False),
    ("localhost:99999", "127.0.0.1", (), False),
])
def test_host_allow_list(host, bound, allowed, ok):
    error = Policy(bound_host=bound, allowed_hosts=allowed).check("GET", "/v1/models", {"host": host})
    assert (error is None) == ok, error and error.message


# -- slow and idle connections ------------------------------------------------------------------------------


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes `sock` (reading and dropping anything it sends); fails after `seconds`."""
    start = time.monotonic()
    sock.settimeout(seconds)
    while sock.recv(4096):
        pass
    return time.monotonic() - start


def test_half_sent_and_idle_connections_are_closed(parts):
    with serving(parts, read_timeout=0.5, keep_alive_timeout=0.5) as server:
        address = ("127.0.0.1", server.port)
        request = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(json.dumps(COMPLETION))}\r\n\r\n{json.dumps(COMPLETION)}").encode()
        half_sent = [b"", request[:20], request[:-5]]  # nothing, part of the headers, part of the body
        socks = [socket.create_connection(address) for _ in half_sent]
        for sock, data in zip(socks, half_sent):
            sock.sendall(data)
        for sock in socks:
            with sock:
                assert closed_within(sock, 10) < 5
        with socket.create_connection(address) as sock:  # a whole request, then half of the next one
            sock.sendall(request)
            sock.settimeout(10)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            sock.sendall(request[:30])
            assert closed_within(sock, 10) < 5
        with socket.create_connection(address) as sock:  # idle after an answer: the keep-alive timeout
            sock.sendall(request)
            assert closed_within(sock, 10) < 5
        # a request that takes longer than read_timeout to answer is not cut off
        with slow_steps(server.server.config.app.state.scheduler, 0.05):
            r = post(server.url + "/v1/completions", dict(COMPLETION, max_tokens=30, ignore_eos=True, stream=True))
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
