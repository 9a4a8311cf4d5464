"""Serve a reasoning model: `<think>` text apart as reasoning_content (whole and streamed), a thinking budget that
closes the thinking and lets the model answer; checked with the `openai` SDK against the served app."""

from __future__ import annotations

import pytest
import torch
from tinymodels import mha_model, text_tokenizer

from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.posttrain.sft import sft_loss
from lmforge.serve.reasoning import ThinkBudget, effort_budget
from lmforge.tasks.reasoning import ThinkSplitter, split_reasoning
from lmforge.tokenizer.chat import encode_conversation, pad_batch, prompt_ids, stop_token_ids

PROMPT = [{"role": "user", "content": "calc: 3 + 4 - 2"}]
SOLUTION = "<think>\n1. 3+4=7\n2. 7-2=5\n</think>\n5"


@pytest.mark.parametrize("text, reasoning, content", [
    (SOLUTION, "1. 3+4=7\n2. 7-2=5", "5"),
    ("plain answer", None, "plain answer"),
    ("  <think>\nhalf a thought", "half a thought", ""),  # cut off while thinking: no answer yet
    ("<think></think>\n\nok", "", "ok"),
    ("<thin", None, "<thin"),  # not a tag after all
    ("the <think> tag in an answer", None, "the <think> tag in an answer"),
])
def test_splitter_whole_and_streamed_agree(text, reasoning, content):
    assert split_reasoning(text) == (reasoning, content)
    for size in (1, 2, 3, 7):  # any cut of the text into pieces joins to the same split
        s, r, c = ThinkSplitter(), "", ""
        for i in range(0, len(text), size):
            a, b = s.feed(text[i:i + size])
            r, c = r + a, c + b
        a, b = s.finish()
        assert (r + a, c + b) == (reasoning or "", content), size


def test_chat_and_generate_show_the_thinking_apart():
    from lmforge.generate.chat import ThinkShown

    for text, shown in ((SOLUTION, "[thinking] 1. 3+4=7\n2. 7-2=5\n[answer] 5"), ("just text\n", "just text\n")):
        out = []
        s = ThinkShown(out.append)
        for i in range(0, len(text), 3):
            s.write(text[i:i + 3])
        s.finish()
        assert "".join(out) == shown


def test_budget_forces_the_close_once():
    tok = text_tokenizer()
    b = ThinkBudget(2, tok)
    assert b.push("<thi") == [] and b.push("nk>\n") == [] and b.push("1. ") == []
    assert tok.decode(b.push("3+")) == "\n</think>\n" and b.push("x") == []
    b = ThinkBudget(1, tok)
    assert b.push("<think>") == [] and tok.decode(b.push("a\n")) == "</think>\n"
    b = ThinkBudget(1, tok)
    assert b.push("<think>") == [] and tok.decode(b.push("a</th")) == "ink>\n"  # a started tag is completed
    assert ThinkBudget(0, tok).push("hello") == []  # a response that does not think is never touched
    assert tok.decode(ThinkBudget(0, tok).push("<think>")) == "\n</think>\n"
    assert [effort_budget(e, 100) for e in ("minimal", "low", "medium", "high")] == [0, 25, 50, None]


@pytest.fixture(scope="module")
def thinker():
    """A tiny model that memorized one thinking answer to one prompt (greedy reproduces it)."""
    tok = text_tokenizer()
    torch.manual_seed(0)
    model = mha_model(tok.vocab_size, seed=3, max_seq_len=128)
    enc = encode_conversation(tok, [*PROMPT, {"role": "assistant", "content": SOLUTION}], 128)
    ids, labels = pad_batch([enc], 0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        loss, _ = sft_loss(model, {"input_ids": ids, "labels": labels})
        if loss.item() < 0.01:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    stops = stop_token_ids(tok)
    tokens = generate(model, prompt_ids(tok, PROMPT), SamplingParams(greedy=True, max_new_tokens=40,
                                                                     stop_token_ids=stops))
    assert tok.decode(tokens) == SOLUTION, "the tiny model did not memorize its answer"
    return model, tok, tokens


@pytest.fixture(scope="module")
def reasoning_client(thinker):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from tinyserver import NAME

    from lmforge.serve.app import BackgroundServer, create_app

    model, tok, _ = thinker
    with BackgroundServer(create_app(model, tok, NAME)) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def ask(client, stream: bool = False, **extra):
    from tinyserver import NAME

    return client.chat.completions.create(model=NAME, messages=PROMPT, temperature=0, max_tokens=40, stream=stream,
                                          **({"extra_body": extra} if extra else {}))


def test_reasoning_content_apart_whole_and_streamed(reasoning_client):
    msg = ask(reasoning_client).choices[0].message
    assert msg.reasoning_content == "1. 3+4=7\n2. 7-2=5" and msg.content == "5"
    reasoning, content, roles = "", "", set()
    for chunk in ask(reasoning_client, stream=True):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
            roles.add(choice.delta.role)
    assert (reasoning, content) == ("1. 3+4=7\n2. 7-2=5", "5") and "assistant" in roles


def thinking_prefix(tok, tokens: list[int], k: int) -> str:
    """The thinking text of the first k tokens after the one that completes <think>."""
    opened = next(i for i in range(len(tokens)) if "<think>" in tok.decode(tokens[:i + 1]))
    return tok.decode(tokens[:opened + 1 + k]).split("<think>", 1)[1].strip()


@pytest.mark.parametrize("budget", [0, 3, 6])
def test_thinking_budget_closes_the_thinking_and_the_model_answers(reasoning_client, thinker, budget):
    _, tok, tokens = thinker
    for stream in (False, True):
        out = ask(reasoning_client, stream=stream, max_reasoning_tokens=budget)
        if stream:
            chunks = [c.choices[0].delta for c in out if c.choices]
            reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in chunks)
            content = "".join(d.content or "" for d in chunks)
        else:
            reasoning, content = out.choices[0].message.reasoning_content, out.choices[0].message.content
        assert reasoning == thinking_prefix(tok, tokens, budget), (budget, stream)
        assert "</think>" not in content and "<think>" not in content
    full = ask(reasoning_client, max_reasoning_tokens=100).choices[0].message  # a budget it does not reach
    assert full.reasoning_content == "1. 3+4=7\n2. 7-2=5" and full.content == "5"


def test_reasoning_effort_and_bad_budgets(reasoning_client):
    import openai

    assert ask(reasoning_client, reasoning_effort="minimal").choices[0].message.reasoning_content == ""
    assert ask(reasoning_client, reasoning_effort="high").choices[0].message.content == "5"
    for bad in ({"max_reasoning_tokens": -1}, {"max_reasoning_tokens": "many"}, {"reasoning_effort": "extreme"}):
        with pytest.raises(openai.BadRequestError, match="max_reasoning_tokens|reasoning_effort"):
            ask(reasoning_client, **bad)
