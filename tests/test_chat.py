import io

import pytest
import torch
from textdata import SHAKESPEARE

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.generate.chat import ChatSession, apply_settings, chat_loop
from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer, save_model
from lmforge.tokenizer.chat import prompt_ids, stop_token_ids
from lmforge.tokenizer.train import train_bpe


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([SHAKESPEARE.read_text(encoding="utf-8")[:100_000]], vocab_size=350, show_progress=False)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Transformer(from_dict(ModelConfig, {"preset": "debug", "vocab_size": tokenizer.vocab_size,
                                               "max_seq_len": 128})).eval()


def greedy_answer(model, tokenizer, messages, n=12):
    ids = generate(model, prompt_ids(tokenizer, messages),
                   SamplingParams(greedy=True, max_new_tokens=n, stop_token_ids=stop_token_ids(tokenizer)))
    return tokenizer.decode(ids)


def test_settings_parse_and_validate():
    p = apply_settings(SamplingParams(), " temperature=0.7 top_p=0.9 max_new_tokens=5 seed=3")
    assert (p.temperature, p.top_p, p.max_new_tokens, p.seed) == (0.7, 0.9, 5, 3)
    with pytest.raises(LmforgeError, match="unknown setting 'temprature' \\(did you mean 'temperature'"):
        apply_settings(p, "temprature=1")
    with pytest.raises(LmforgeError, match="top_p must be in"):
        apply_settings(p, "top_p=1.5")
    with pytest.raises(LmforgeError, match="expected key=value"):
        apply_settings(p, "top_p")


def test_history_is_kept_and_reset(model, tokenizer):
    session = ChatSession(model, tokenizer, SamplingParams(temperature=0, max_new_tokens=12))
    pieces = []
    first = session.reply("Who comes here?", pieces.append)
    assert "".join(pieces) == first == greedy_answer(model, tokenizer, [{"role": "user", "content": "Who comes here?"}])
    second = session.reply("And then?", lambda _: None)
    history = [{"role": "user", "content": "Who comes here?"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And then?"}]
    assert second == greedy_answer(model, tokenizer, history)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    session.reset()
    assert session.reply("Who comes here?", lambda _: None) == first


def test_long_history_drops_oldest_turns(model, tokenizer):
    session = ChatSession(model, tokenizer, SamplingParams(temperature=0, max_new_tokens=8))
    for i in range(12):
        session.reply(f"Tell me more about the king and the queen, part {i}.", lambda _: None)
    assert len(session.prompt_ids()) <= 128 - 8
    assert session.messages[-1]["role"] == "assistant" and len(session.messages) < 24


def test_chat_command_reads_piped_stdin(tmp_path, model, tokenizer, monkeypatch, capsys):
    save_model(model, tmp_path / "m")
    tokenizer.save(tmp_path / "m")
    lines = ["/settings temperature=0 max_new_tokens=10", "Who comes here?", "/settings top_p=2",
             "/bogus", "/reset", "Who comes here?", "/quit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--checkpoint", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "settings: temperature=0.0 top_k=0 top_p=1.0 max_new_tokens=10 seed=None" in out
    want = greedy_answer(model, tokenizer, [{"role": "user", "content": "Who comes here?"}], n=10)
    assert out.count(f"assistant: {want}\n") == 2  # same answer again after /reset
    assert "error: top_p must be in (0, 1]" in out and "unknown command /bogus" in out
    assert "(conversation reset)" in out


def test_loop_counts_answers_and_stops_at_quit(model, tokenizer):
    session = ChatSession(model, tokenizer, SamplingParams(temperature=0.8, max_new_tokens=4, seed=1))
    out = io.StringIO()
    assert chat_loop(session, ["hi\n", "\n", "there\n", "/quit\n", "ignored\n"], out) == 2
    assert out.getvalue().count("assistant: ") == 2
