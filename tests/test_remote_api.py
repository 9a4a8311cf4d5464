"""API teachers and judges: the OpenAI-compatible client (retries, rate limit, cache, key), the LLM judge, and
Self-Instruct / win rate against `lmforge serve` as the endpoint."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from tinymodels import task_model_dir

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.eval.judge import judge_pairs, parse_verdict
from lmforge.generate.remote import ApiConfig, RateLimiter, RemoteClient
from lmforge.generate.sampling import SamplingParams
from lmforge.posttrain.self_instruct import api_generator, model_generator

Reply = tuple[int, dict[str, str], dict[str, Any]]  # status, headers, JSON body


@contextmanager
def fake_endpoint(answer: Callable[[dict[str, Any], dict[str, str]], Reply]) -> Iterator[tuple[str, list]]:
    """An HTTP server whose every POST is answered by `answer(body, headers)`; yields (base URL, requests seen)."""
    seen: list[tuple[dict[str, Any], dict[str, str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._reply(200, {}, {"object": "list", "data": [{"id": "judge-model", "object": "model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            headers = dict(self.headers.items())
            seen.append((body, headers))
            self._reply(*answer(body, headers))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def chat_reply(text: str) -> Reply:
    return 200, {}, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def failing_first(n: int, status: int, headers: dict[str, str] | None = None) -> Callable[..., Reply]:
    calls = [0]

    def answer(body: dict[str, Any], _headers: dict[str, str]) -> Reply:
        calls[0] += 1
        if calls[0] <= n:
            return status, headers or {}, {"error": {"message": "slow down", "type": "rate_limit"}}
        return chat_reply("ok")

    return answer


def client(url: str, sleeps: list[float] | None = None, **api: Any) -> RemoteClient:
    record = sleeps.append if sleeps is not None else (lambda s: None)
    return RemoteClient(url, ApiConfig(**{"cache": "off", **api}), sleep=record)


def test_retries_honour_retry_after_then_succeed():
    sleeps: list[float] = []
    with fake_endpoint(failing_first(2, 429, {"Retry-After": "3"})) as (url, seen):
        c = client(url, sleeps, model="m")
        assert c.post("/chat/completions", {"messages": []})["choices"][0]["message"]["content"] == "ok"
    assert sleeps == [3.0, 3.0] and c.stats["retries"] == 2 and len(seen) == 3


def test_overload_backs_off_exponentially_and_gives_up_with_a_clear_error():
    sleeps: list[float] = []
    with fake_endpoint(failing_first(10, 503)) as (url, seen):
        c = client(url, sleeps, model="m", max_retries=3, backoff=0.5)
        with pytest.raises(LmforgeError, match=r"gave up after 4 tries: HTTP 503: slow down"):
            c.post("/chat/completions", {"messages": []})
    assert sleeps == [0.5, 1.0, 2.0] and len(seen) == 4


def test_a_client_error_fails_at_once_with_the_servers_message():
    with fake_endpoint(lambda b, h: (400, {}, {"error": {"message": "'messages' is required"}})) as (url, seen):
        with pytest.raises(LmforgeError, match=r"POST http://127.0.0.1:\d+/v1/chat/completions: HTTP 400: "
                                               r"'messages' is required"):
            client(url, model="m").post("/chat/completions", {})
    assert len(seen) == 1


def test_unreachable_endpoint_retries_then_errors():
    sleeps: list[float] = []
    c = client("http://127.0.0.1:9/v1", sleeps, model="m", max_retries=2, backoff=0.0, timeout=2)
    with pytest.raises(LmforgeError, match="gave up after 3 tries"):
        c.post("/completions", {"prompt": "x"})
    assert sleeps == [0.0, 0.0]


def test_key_comes_from_the_environment_and_model_from_the_server(monkeypatch):
    with fake_endpoint(lambda b, h: chat_reply("ok")) as (url, seen):
        monkeypatch.delenv("MY_KEY", raising=False)
        client(url, key_env="MY_KEY").post("/chat/completions", {"messages": []})
        monkeypatch.setenv("MY_KEY", "sk-secret")
        client(url, key_env="MY_KEY").post("/chat/completions", {"messages": []})
    (body0, headers0), (_, headers1) = seen
    assert "Authorization" not in headers0 and headers1["Authorization"] == "Bearer sk-secret"
    assert body0["model"] == "judge-model"  # the first id GET /models listed


def test_cache_answers_repeats_across_clients_and_never_stores_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    cache = tmp_path / "cache" / "api.sqlite"
    with fake_endpoint(lambda b, h: chat_reply(b["messages"][0]["content"].upper())) as (url, seen):
        bodies = [{"messages": [{"role": "user", "content": t}], "seed": 1} for t in ("a", "b", "a")]
        first = client(url, model="m", cache=str(cache), concurrency=1)
        assert [r["choices"][0]["message"]["content"] for r in first.map("/chat/completions", bodies)] == \
            ["A", "B", "A"]
        first.close()
        second = client(url, model="m", cache=str(cache))
        assert second.map("/chat/completions", bodies[:2])[1]["choices"][0]["message"]["content"] == "B"
    assert len(seen) == 2 and first.stats["cache_hits"] == 1 and second.stats["cache_hits"] == 2
    assert b"sk-secret" not in cache.read_bytes()


def test_concurrent_requests_keep_request_order():
    with fake_endpoint(lambda b, h: chat_reply(b["messages"][0]["content"])) as (url, seen):
        bodies = [{"messages": [{"role": "user", "content": str(i)}]} for i in range(12)]
        out = client(url, model="m", concurrency=4).map("/chat/completions", bodies)
    assert [r["choices"][0]["message"]["content"] for r in out] == [str(i) for i in range(12)]


def test_rate_limiter_spaces_requests_evenly():
    now = [0.0]
    sleeps: list[float] = []
    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleeps.append)
    for _ in range(3):
        limiter.wait()
    now[0] = 10.0
    limiter.wait()
    assert sleeps == [0.5, 1.0]  # 120/min = one start every 0.5 s; after a pause, no wait


def test_bad_api_options_are_one_line_errors(tmp_path):
    with pytest.raises(LmforgeError, match="api.concurrency must be >= 1"):
        ApiConfig(concurrency=0)
    with pytest.raises(LmforgeError, match="must start with http"):
        RemoteClient("localhost:8000/v1", ApiConfig(cache="off"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LmforgeError, match="cannot open the API response cache"):
        RemoteClient("http://x/v1", ApiConfig(cache=str(blocker / "api.sqlite")))


@pytest.mark.parametrize("reply, verdict", [("A", "A"), ("B.", "B"), ("Tie", "tie"), ("Answer B is better", "B"),
                                            ("a tie", "tie"), ("[A]", "A"), ("I cannot decide", None),
                                            ("B is a better answer", "B")])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def judge_preferring(word: str) -> Callable[..., Reply]:
    """A judge that picks the answer containing `word` (or says 'A' when both or neither do)."""
    def answer(body: dict[str, Any], _headers: dict[str, str]) -> Reply:
        text = body["messages"][1]["content"]
        first = text.split("[Answer A]")[1].split("[End of answer A]")[0]
        second = text.split("[Answer B]")[1].split("[End of answer B]")[0]
        if (word in first) == (word in second):
            return chat_reply("A")
        return chat_reply("A" if word in first else "B")
    return answer


def test_llm_judge_counts_both_orders():
    with fake_endpoint(judge_preferring("right")) as (url, seen):
        out = judge_pairs(client(url, model="m"), ["q1", "q2", "q3"], ["right", "x", "same"], ["y", "right", "same"])
    assert out["scores"] == [1.0, 0.0, 0.5]  # the third: the judge always says "A" = position bias -> a tie
    assert out["position_consistency"] == pytest.approx(2 / 3) and out["invalid"] == 0
    assert len(seen) == 6 and all(b["temperature"] == 0.0 for b, _ in seen)


# ---------------------------------------------------------------------------------------------- lmforge serve


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    pytest.importorskip("fastapi")
    from tinyserver import serving

    directory = tmp_path_factory.mktemp("served")
    with serving(directory, context=512) as (server, _model, _tok):  # room for a judge prompt
        yield server.url + "/v1", directory


def test_api_teacher_continues_exactly_as_the_local_model(endpoint):
    url, directory = endpoint
    sampling = SamplingParams(greedy=True, max_new_tokens=12)
    prompts = ["Come up with a series of tasks:\n\nTask 1: Name a colour.\nTask 2:", "Instruction: add\nInput:"]
    remote = api_generator(RemoteClient(url, ApiConfig(cache="off")), sampling)(prompts)
    local = model_generator(str(directory), sampling, "cpu")(prompts)
    assert remote == local and any(remote)


def test_self_instruct_with_a_teacher_url_and_its_cache(endpoint, tmp_path):
    url, _ = endpoint
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": f"Name topic {i} now.",
                                         "instances": [{"input": "", "output": f"{i}."}]}) + "\n"
                             for i in range(8)))
    args = ["self-instruct", "--teacher-url", url, "--seed_tasks", str(seeds), "--num_instructions", "2",
            "--requests_per_round", "2", "--max_rounds", "2", "--sampling.max_new_tokens", "12",
            "--num_human", "2", "--num_machine", "1", "--num_shots", "1", "--sampling.seed", "5",
            "--api.cache", str(tmp_path / "api.sqlite")]
    assert main([*args, "--run_dir", str(tmp_path / "a")]) == 0
    assert main([*args, "--run_dir", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "stats.json").read_text())
    b = json.loads((tmp_path / "b" / "stats.json").read_text())
    assert a["generated"] >= 2 and a["api"]["cache_hits"] == 0 and a["api"]["requests"] >= 2
    # the rerun sends only GET /models (the model id is part of each cached request); every answer is cached
    assert b["api"]["requests"] == 1 and b["api"]["cache_hits"] == a["api"]["requests"] - 1
    assert (tmp_path / "a" / "instructions.json").read_bytes() == (tmp_path / "b" / "instructions.json").read_bytes()


def test_self_instruct_needs_exactly_one_teacher(tmp_path, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "Say hi to everyone.", "instances": [{"output": "hi"}]}) + "\n")
    assert main(["self-instruct", "--seed_tasks", str(seeds), "--run_dir", str(tmp_path / "r")]) != 0
    assert "exactly one teacher" in capsys.readouterr().err


def test_winrate_with_an_llm_judge_behind_lmforge_serve(endpoint, tmp_path):
    url, _ = endpoint
    a, b = task_model_dir(tmp_path / "a", seed=0), task_model_dir(tmp_path / "b", seed=1)
    out = tmp_path / "winrate.json"
    assert main(["eval", "winrate", "--checkpoint", str(a), "--baseline", str(b), "--judge", "api", "--judge-url",
                 url, "--n", "3", "--max_new_tokens", "4", "--api.cache", "off", "--output", str(out),
                 "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 3 and result["wins"] + result["ties"] + result["losses"] == 3
    assert result["judge_api"]["requests"] == 1 + 6  # GET /models, then each pair judged in both orders
    assert 0 <= result["judge_invalid"] <= 6 and result["judge"] == "api"


def test_judge_url_without_the_api_judge_is_an_error(tmp_path, capsys):
    a = task_model_dir(tmp_path / "a")
    assert main(["eval", "winrate", "--checkpoint", str(a), "--baseline", str(a), "--judge-url",
                 "http://localhost:1/v1", "--n", "2"]) != 0
    assert "--judge-url is only used with --judge api" in capsys.readouterr().err
