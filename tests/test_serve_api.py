"""The OpenAI API as real clients use it: the official `openai` SDK (and lm-evaluation-harness) against
`lmforge serve` for n, batched prompts, logprobs, echo, penalties, logit_bias, roles, response_format and
the refusals. Every number the server reports is checked against a direct forward pass of the model."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tinymodels import mha_model as tiny_model  # noqa: E402
from tinymodels import text_tokenizer as tiny_tokenizer  # noqa: E402
from tinyserver import NAME, greedy_reference, serving  # noqa: E402

from lmforge.generate.engine import generate  # noqa: E402
from lmforge.generate.sampling import SamplingParams  # noqa: E402
from lmforge.serve.app import BackgroundServer, create_app  # noqa: E402
from lmforge.serve.protocol import token_text  # noqa: E402
from lmforge.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer  # noqa: E402
from lmforge.tokenizer.chat import prompt_ids, stop_token_ids  # noqa: E402


def log_softmax_rows(model, ids) -> torch.Tensor:
    """[len(ids), V]: row t is the model's log-distribution of the token after ids[:t + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def greedy_ids(model, ids, n, stops=()):
    return generate(model, ids, SamplingParams(greedy=True, max_new_tokens=n, stop_token_ids=list(stops)))


def test_n_and_batched_prompts_return_every_choice_in_order(served, client):
    _, model, tok = served
    prompts = ["Romeo", "To be, or"]
    refs = [greedy_reference(model, tok, tok.sequence_start + tok.encode(p), 8, []) for p in prompts]
    kw = dict(model=NAME, temperature=0, max_tokens=8, n=2, extra_body={"ignore_eos": True})
    for prompt in (prompts, [tok.sequence_start + tok.encode(p) for p in prompts]):
        out = client.completions.create(prompt=prompt, **kw)
        assert [c.index for c in out.choices] == [0, 1, 2, 3]
        assert [c.text for c in out.choices] == [refs[0], refs[0], refs[1], refs[1]]
        assert out.usage.prompt_tokens == sum(len(tok.sequence_start + tok.encode(p)) for p in prompts)
        assert out.usage.completion_tokens == 4 * 8
    chunks = list(client.completions.create(prompt=prompts, stream=True, **kw))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(4)]
    assert texts == [refs[0], refs[0], refs[1], refs[1]]
    # sampled choices differ from each other, and a seed reproduces all of them
    sample = dict(model=NAME, messages=[{"role": "user", "content": "Speak"}], temperature=1.0, max_tokens=12, n=3,
                  seed=7, extra_body={"ignore_eos": True})
    first = [c.message.content for c in client.chat.completions.create(**sample).choices]
    assert len(set(first)) == 3
    assert [c.message.content for c in client.chat.completions.create(**sample).choices] == first
    streamed = list(client.chat.completions.create(**sample, stream=True))
    assert ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
            for i in range(3)] == first


def test_chat_logprobs_equal_the_models_distribution(served, client):
    _, model, tok = served
    messages = [{"role": "user", "content": "What light?"}]
    out = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=6, logprobs=True,
                                         top_logprobs=3, extra_body={"ignore_eos": True})
    ids = prompt_ids(tok, messages)
    gen = greedy_ids(model, ids, 6)
    rows = log_softmax_rows(model, ids + gen)
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == [token_text(tok, t)[0] for t in gen]
    joined = b"".join(bytes(c.bytes) for c in content)  # true bytes; the text shows a broken character as U+FFFD
    assert joined.decode("utf-8", errors="replace") == out.choices[0].message.content
    for k, (entry, token) in enumerate(zip(content, gen)):
        row = rows[len(ids) - 1 + k]
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert entry.token.startswith("bytes:") or entry.bytes == list(entry.token.encode("utf-8"))
        best = torch.topk(row, 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
    plain = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=6,
                                           extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == out.choices[0].message.content
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=6,
                                                 logprobs=True, extra_body={"ignore_eos": True}, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-6)
    assert all(e.top_logprobs == [] for e in streamed)


def test_completion_echo_scores_the_prompt_as_lm_eval_reads_it(served, client):
    """lm-evaluation-harness sends `logprobs: 1, echo: true, max_tokens: 1` (or 0) with token ids and sums
    token_logprobs[ctxlen:-1]: every prompt token's logprob must be the model's, the first one null."""
    _, model, tok = served
    ids = tok.sequence_start + tok.encode("Now is the winter of our discontent")
    rows = log_softmax_rows(model, ids)
    for max_tokens in (0, 1):
        out = client.completions.create(model=NAME, prompt=ids, logprobs=1, echo=True, max_tokens=max_tokens,
                                        temperature=0)
        lp = out.choices[0].logprobs
        assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for t in range(1, len(ids)):
            assert lp.token_logprobs[t] == pytest.approx(float(rows[t - 1, ids[t]]), abs=1e-4)
            best = int(rows[t - 1].argmax())
            assert max(lp.top_logprobs[t], key=lp.top_logprobs[t].get) == token_text(tok, best)[0]
        assert out.choices[0].text.startswith(tok.decode(ids))
        text_offsets = lp.text_offset
        assert text_offsets == sorted(text_offsets) and text_offsets[0] == 0
        assert out.usage.completion_tokens == max_tokens
    one = client.completions.create(model=NAME, prompt=ids[:1], logprobs=1, echo=True, max_tokens=0)
    assert one.choices[0].logprobs.token_logprobs == [None] and one.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=NAME, prompt=ids, logprobs=1, echo=True, max_tokens=1,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == \
        out.choices[0].logprobs.token_logprobs
    last = out.choices[0].logprobs
    greedy = int(rows[-1].argmax())
    assert last.tokens[-1] == token_text(tok, greedy)[0]
    assert last.token_logprobs[-1] == pytest.approx(float(rows[-1, greedy]), abs=1e-4)
    # without echo, only the generated tokens; text_offset counts characters of the returned text
    out = client.completions.create(model=NAME, prompt="Romeo", logprobs=2, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    gen = greedy_ids(model, tok.sequence_start + tok.encode("Romeo"), 5)
    assert lp.tokens == [token_text(tok, t)[0] for t in gen] and all(len(top) >= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r_bad(served, "/v1/completions", {"prompt": "a", "max_tokens": 0}) == "max_tokens"  # 0 needs echo


def r_bad(served, route, body):
    """POST an invalid request; assert a 400 in OpenAI's error shape and return its `param`."""
    data = body if isinstance(body, (bytes, str)) else json.dumps({"model": NAME, **body})
    r = httpx.post(served[0].url + route, content=data, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, (body, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    return err["param"]


def test_penalties_and_logit_bias_change_the_output_as_the_engine_does(served, client):
    _, model, tok = served
    ids = tok.sequence_start + tok.encode("The king")
    kw = dict(model=NAME, prompt="The king", temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    for name in ("frequency_penalty", "presence_penalty"):
        want = generate(model, ids, SamplingParams(greedy=True, max_new_tokens=24, **{name: 1.5}))
        out = client.completions.create(**kw, **{name: 1.5}).choices[0].text
        assert out == tok.decode(want) and out != plain
    first = greedy_ids(model, ids, 1)[0]
    banned = client.completions.create(**kw, logit_bias={str(first): -100}, logprobs=0)
    assert banned.choices[0].logprobs.tokens[0] != token_text(tok, first)[0]
    forced = tok.encode(" the")[0]
    out = client.completions.create(**kw, logit_bias={str(forced): 100})
    assert out.choices[0].text == tok.decode([forced] * 24)


def test_roles_and_model_route(served, client):
    _, model, tok = served
    system = client.chat.completions.create(model=NAME, temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    developer = client.chat.completions.create(model=NAME, temperature=0, max_tokens=8, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert developer.choices[0].message.content == system.choices[0].message.content
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens
    # the default template has no tool role: a 400 naming the messages, not a silent drop
    tool_turn = [{"role": "user", "content": "2+2?"}, {"role": "tool", "content": "4", "tool_call_id": "c1"}]
    assert r_bad(served, "/v1/chat/completions", {"messages": tool_turn}) == "messages"
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_tokenizer_routes_as_vllm_has_them(served):
    url, tok = served[0].url, served[2]
    r = httpx.post(url + "/tokenize", json={"prompt": "To be", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("To be") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 128
    started = httpx.post(url + "/tokenize", json={"prompt": "To be"}).json()["tokens"]
    assert started == tok.sequence_start + tok.encode("To be")
    messages = [{"role": "user", "content": "hi"}]
    assert httpx.post(url + "/tokenize", json={"messages": messages}).json()["tokens"] == prompt_ids(tok, messages)
    assert httpx.post(url + "/detokenize", json={"tokens": tok.encode("To be")}).json() == {"prompt": "To be"}
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.special_tokens["eos"] and info["chat_template"] == tok.chat_template
    assert httpx.post(url + "/detokenize", json={"tokens": [10**6]}).status_code == 400


def test_tool_role_renders_through_a_template_that_has_one():
    tok = tiny_tokenizer()
    template = DEFAULT_CHAT_TEMPLATE.replace("['system', 'user', 'assistant']", "['system', 'user', 'assistant', "
                                                                                 "'tool']")
    tok = Tokenizer(tok.tk, template, special_tokens=tok.special_tokens)
    model = tiny_model(tok.vocab_size, seed=3, init_std=0.2, max_seq_len=128)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "tool", "content": "4", "tool_call_id": "c1"}]
    with BackgroundServer(create_app(model, tok, NAME)) as server:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": messages,
                                                                  "max_tokens": 6, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    ids = prompt_ids(tok, [{"role": m["role"], "content": m["content"]} for m in messages])
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    assert r.json()["choices"][0]["message"]["content"] == greedy_reference(model, tok, ids, 6, stop_token_ids(tok))


def test_response_format_json_schema_is_enforced(served, client):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer",
              "minimum": 0, "maximum": 99}}, "required": ["answer", "n"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Answer in JSON."}]
    for temperature in (0, 1.0):
        out = client.chat.completions.create(
            model=NAME, messages=messages, temperature=temperature, seed=3, max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
        value = json.loads(out.choices[0].message.content)
        assert set(value) == {"answer", "n"} and value["answer"] in ("yes", "no") and 0 <= value["n"] <= 99
        assert out.choices[0].finish_reason == "stop"
    out = client.chat.completions.create(model=NAME, messages=messages, temperature=1.0, seed=1, max_tokens=60,
                                         response_format={"type": "json_object"})
    text = out.choices[0].message.content
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":  # a random model may run out of tokens inside the object
        assert isinstance(json.loads(text), dict)
    bad = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nonsense"}}}
    assert r_bad(served, "/v1/chat/completions", {"messages": messages, "response_format": bad}) == "response_format"
    assert r_bad(served, "/v1/chat/completions", {"messages": messages, "response_format": {"type": "xml"}}) \
        == "response_format"


@pytest.mark.parametrize("route,body,param", [
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     "temperature"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                             '"temperature": Infinity}', "temperature"),
    ("/v1/completions", '{"model": "tiny", "prompt": "a", "top_p": NaN}', "top_p"),
    ("/v1/completions", {"prompt": "a", "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": "a", "suffix": "tail"}, "suffix"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"99999": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "a", "n": 200}, "n"),
    ("/v1/completions", {"prompt": ["a", 3]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 10}, "n"),  # 20 choices > max_concurrent 16
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]},
     "messages.[0].tool_calls"),
])
def test_unsupported_or_invalid_fields_are_400_naming_the_field(served, route, body, param):
    assert r_bad(served, route, body) == param


def test_validation_errors_reach_the_sdk(client):
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.completions.create(model=NAME, prompt="a", seed=2**70)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=NAME, prompt="a", suffix="b")


TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: [".", "\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow
def test_lm_eval_through_the_server_equals_lm_eval_on_the_hf_export(tmp_path, monkeypatch):
    """lm-evaluation-harness `local-completions` (token-id requests, `echo` + `logprobs`) against `lmforge serve`
    scores a multiple-choice task and generates exactly as lm-eval `--model hf` does on the `convert to-hf` export."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lmforge.model.hf.convert import to_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lines = ["To be, or not to be: that is the", "Now is the winter of our", "Friends, Romans, lend me your",
             "What light through yonder window", "The quality of mercy is not", "All the world's a"]
    choices = ["question", "discontent", "ears", "breaks", "strained", "stage"]
    docs = [{"question": q, "choices": [choices[i], choices[(i + 1) % 6], choices[(i + 3) % 6]], "answer": i % 3}
            for i, q in enumerate(lines)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "data.jsonl"))
    (tmp_path / "tasks" / "tiny_gen.yaml").write_text(GEN_YAML.format(data=tmp_path / "data.jsonl"))
    tasks = TaskManager(include_path=str(tmp_path / "tasks"))
    with serving(tmp_path / "ckpt") as (server, model, tok):
        hf_dir = to_hf(tmp_path / "ckpt", tmp_path / "hf")
        results = {}
        served = {"model": NAME, "base_url": server.url + "/v1/completions", "max_retries": 1, "batch_size": 3}
        runs = {"served, HF tokenizer": ("local-completions", {**served, "tokenizer": str(hf_dir),
                                                               "tokenizer_backend": "huggingface"}),
                "served, the server's tokenizer": ("local-completions", served),  # /tokenizer_info, /tokenize
                # local-completions encodes text without the tokenizer's start token (eos on an lmforge export, see
                # lmforge.tokenizer.chat); lm-eval's hf model does the same with add_bos_token=False
                "hf": ("hf", {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu", "add_bos_token": False})}
        for key, (kind, args) in runs.items():
            results[key] = lm_eval.simple_evaluate(model=kind, model_args=args, tasks=["tiny_mc", "tiny_gen"],
                                                   task_manager=tasks, log_samples=True)
    hf_run = results.pop("hf")
    hf_ll = [[r[0] for r in s["filtered_resps"]] for s in hf_run["samples"]["tiny_mc"]]
    assert len(hf_ll) == len(docs)
    for run in results.values():
        assert run["results"]["tiny_mc"]["acc,none"] == hf_run["results"]["tiny_mc"]["acc,none"]
        served_ll = [[r[0] for r in s["filtered_resps"]] for s in run["samples"]["tiny_mc"]]
        assert served_ll == [pytest.approx(row, abs=1e-3) for row in hf_ll]
        texts = [s["filtered_resps"] for s in run["samples"]["tiny_gen"]]
        assert texts == [s["filtered_resps"] for s in hf_run["samples"]["tiny_gen"]]
    assert any(text[0].strip() for text in texts)  # the model wrote something before its stop string


TOOL_TEMPLATE = (
    "{%- if tools -%}<|system|>\nCall a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>. Tools:\n"
    "{%- for t in tools %}\n{{ t | tojson }}{% endfor %}<|end|>\n{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] -}}"
    "{%- for c in message.tool_calls or [] -%}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{%- endfor -%}{{- '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tool_server():
    pytest.importorskip("llguidance")
    base = tiny_tokenizer()
    tok = Tokenizer(base.tk, TOOL_TEMPLATE, special_tokens=base.special_tokens)
    model = tiny_model(tok.vocab_size, seed=3, init_std=0.2, max_seq_len=1024)  # the tools' JSON is ~400 tokens
    with BackgroundServer(create_app(model, tok, NAME, max_batch=4)) as server:
        yield server, model, tok, openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)


def test_tools_are_rendered_and_forced_calls_come_back_as_tool_calls(tool_server):
    _, model, tok, client = tool_server
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER, TIME], tool_choice=named,
                                         temperature=0, max_tokens=40)
    assert out.usage.prompt_tokens == len(prompt_ids(tok, messages, tools=[WEATHER, TIME]))
    assert out.usage.prompt_tokens > len(prompt_ids(tok, messages))  # the tools were shown to the model
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    out = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER, TIME], tool_choice="required",
                                         temperature=1.0, seed=4, max_tokens=120)
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and calls
    for c in calls:
        args = json.loads(c.function.arguments)
        assert (c.function.name, set(args)) in (("get_weather", {"city"}), ("get_time", {"zone"}))
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER, TIME],
                                                 tool_choice=named, temperature=0, max_tokens=40, stream=True))
    content, calls = accumulate(chunks)
    assert content is None and [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", choice.message.tool_calls[0].function.arguments)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def accumulate(chunks) -> tuple[str | None, list[dict]]:
    """A streamed chat answer put together as a client does: the content, and each call by its index (id, type
    and name from its first delta, the arguments as the concatenation of every piece)."""
    content, calls = None, []
    for chunk in chunks:
        for d in [c.delta for c in chunk.choices]:
            if d.content:
                content = (content or "") + d.content
            for tc in d.tool_calls or []:
                if tc.index == len(calls):
                    assert tc.id and tc.type == "function" and tc.function.name  # the header comes first
                    calls.append({"id": tc.id, "name": tc.function.name, "arguments": ""})
                calls[tc.index]["arguments"] += tc.function.arguments or ""
    return content, calls


SCRIPTED = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')


def test_auto_tool_calls_stream_incrementally_and_add_up_to_the_whole_answer(tool_server):
    """A model that writes Hermes calls (the real model's forward replaced by a script of token ids): the `openai`
    SDK's stream gives content first, then each call's header and its arguments in several pieces, and the
    accumulated deltas equal the non-streamed message."""
    server, model, tok, client = tool_server
    scheduler = server.server.config.app.state.scheduler
    script = tok.encode(SCRIPTED) + [stop_token_ids(tok)[0]]

    def scripted(jobs, rows, starts, chunks, full=False, prompts=False):
        logits = torch.full((len(jobs), 1, model.cfg.vocab_size), -10.0)
        for i, job in enumerate(jobs):
            logits[i, 0, script[len(job.generated)]] = 10.0
        return logits

    scheduler._forward = scripted
    try:
        ask = dict(model=NAME, messages=[{"role": "user", "content": "Weather and time?"}], tools=[WEATHER, TIME],
                   temperature=0, max_tokens=len(script) + 5)
        whole = client.chat.completions.create(**ask).choices[0]
        chunks = list(client.chat.completions.create(**ask, stream=True))
    finally:
        del scheduler._forward
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    content, calls = accumulate(chunks)
    assert content == whole.message.content
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    pieces = [tc.function.arguments for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []
              if tc.function.arguments]
    assert len(pieces) > 4  # the arguments came as they were written, not in one piece at the end
    kinds = ["content" if c.choices[0].delta.content else "call" for c in chunks
             if c.choices and (c.choices[0].delta.content or c.choices[0].delta.tool_calls)]
    first_call = kinds.index("call")  # plain text streamed as content before the first call, calls after it
    assert first_call > 0 and set(kinds[:first_call]) == {"content"} and set(kinds[first_call:]) == {"call"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_results_go_back_through_the_template(tool_server):
    _, model, tok, client = tool_server
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": None,
                                                                  "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"}]
    out = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], temperature=0, max_tokens=8)
    rendered = tok.apply_chat_template([
        messages[0], {"role": "assistant", "content": "", "tool_calls": [
            {**call, "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "-3 C, snow", "tool_call_id": "call_1"}], tools=[WEATHER])
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in rendered
    assert "<|tool|>\n-3 C, snow" in rendered
    assert out.usage.prompt_tokens == len(tok.encode(rendered))  # the template alone: nothing added outside it
    assert out.choices[0].finish_reason in ("stop", "length")  # auto: a random model writes no call


def test_auto_tool_choice_parses_hermes_calls_out_of_the_text():
    from lmforge.serve.tools import parse_tools

    tools = parse_tools({"tools": [WEATHER, TIME]}, TOOL_TEMPLATE)
    text = 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n' \
           '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    content, calls = tools.calls(text)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert tools.calls("no call here") == ("no call here", [])
    broken = '<tool_call>{"name": "get_weather", "argu</tool_call>'
    assert tools.calls(broken) == (broken, [])  # a call that does not parse stays text
    assert tools.calls('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>')[1] == []


@pytest.mark.parametrize("text", [
    SCRIPTED, "no call here ", " lead <tool_ca", '<tool_call>{"name": "get_weather", "argu</tool_call>',
    'a <tool_call>{"name": "unknown", "arguments": {}}</tool_call> b',
    '<tool_call>{"arguments": {"city": "Oslo"}, "name": "get_weather"}</tool_call> after',
    'x <tool_call>{"name": "get_weather", "arguments": {"city": "Par'])
def test_call_stream_gives_the_same_message_however_the_text_is_cut(text):
    from lmforge.serve.tools import CallStream, parse_tools

    tools = parse_tools({"tools": [WEATHER, TIME]}, TOOL_TEMPLATE)
    whole = tools.calls(text)
    stream = CallStream(tools)
    deltas = [d for ch in text for d in stream.push(ch)] + stream.finish()
    content = "".join(d["content"] for d in deltas if "content" in d) or None
    calls: list[list[str]] = []
    for d in deltas:
        for tc in d.get("tool_calls", []):
            if tc["index"] == len(calls):
                calls.append([tc["function"]["name"], ""])
            calls[tc["index"]][1] += tc["function"]["arguments"]
    assert (content, calls) == (whole[0], [[c["function"]["name"], c["function"]["arguments"]] for c in whole[1]])
