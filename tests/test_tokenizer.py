import hashlib
import importlib.util
import json
import random

import pytest
from textdata import SHAKESPEARE

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.tokenizer import CHAT_TOKENS, SPECIAL_TOKENS, StreamDecoder, Tokenizer
from lmforge.tokenizer.train import byte_level_bpe, train_bpe

UNICODE_SAMPLES = [
    "Hello, world! It's 2024: 1234567 items.",
    "naïve café — ‘quotes’ «guillemets» ½ ∑ ∞",
    "日本語のテキスト、中文字符，한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 keycap 1️⃣",
    "combining e\u0301 and zero\u200bwidth, RTL עברית العربية",
    "tabs\tand\r\nwindows newlines\n\n\n   indented\x00nul\x7f",
    "",
    " ",
]


def corpus_text() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")[:300_000]
    words = "the king and queen of england speak to their people while the lords listen".split()
    rng = random.Random(0)
    return "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(5000))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = corpus_text()
    chunks = (text[i:i + 5000] for i in range(0, len(text), 5000))
    return train_bpe(chunks, vocab_size=600, show_progress=False)


def test_special_tokens_have_fixed_low_ids(tok):
    assert tok.vocab_size == 600
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    for i, token in enumerate([*SPECIAL_TOKENS.values(), *CHAT_TOKENS]):
        assert tok.tk.token_to_id(token) == i
    extra = train_bpe(["some text to train on"] * 10, vocab_size=300, extra_special_tokens=["<|tool|>"],
                      show_progress=False)
    assert extra.tk.token_to_id("<|tool|>") == len(SPECIAL_TOKENS) + len(CHAT_TOKENS)


def test_merges_are_learned_and_pretokenizer_is_gpt4_style(tok):
    assert len(tok.encode(" the king")) < len(b" the king")
    pieces = [p for p, _ in tok.tk.pre_tokenizer.pre_tokenize_str("don't 1234567")]
    assert pieces == ["don", "'t", "Ġ", "123", "456", "7"]  # digits in groups of at most 3


def test_round_trip_is_exact_for_arbitrary_unicode(tok):
    rng = random.Random(1)
    random_text = "".join(chr(rng.choice([rng.randrange(0x20, 0xD800), rng.randrange(0xE000, 0x110000)]))
                          for _ in range(500))
    for text in [*UNICODE_SAMPLES, random_text]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_bos_eos_and_batch_encoding(tok):
    text = "To be, or not to be"
    ids = tok.encode(text)
    assert tok.encode(text, add_bos=True, add_eos=True) == [tok.bos_id, *ids, tok.eos_id]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    assert tok.decode([tok.bos_id, *ids], skip_special_tokens=False) == SPECIAL_TOKENS["bos"] + text
    expected = [tok.encode(t, add_eos=True) for t in UNICODE_SAMPLES]
    assert tok.encode_batch(UNICODE_SAMPLES, add_eos=True) == expected
    no_eos = Tokenizer(byte_level_bpe(), special_tokens={"eos": None})
    with pytest.raises(LmforgeError, match="no eos token"):
        no_eos.encode("x", add_eos=True)


def test_save_load_keeps_sha256_ids_and_template(tok, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    custom = Tokenizer(tok.tk, chat_template=template, special_tokens=tok.special_tokens)
    assert custom.save(tmp_path / "t") == tmp_path / "t"
    loaded = Tokenizer.load(tmp_path / "t")
    assert loaded.sha256 == custom.sha256
    assert hashlib.sha256((tmp_path / "t/tokenizer.json").read_bytes()).hexdigest() == custom.sha256
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (0, 1, 2, 600)
    for text in UNICODE_SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"
    from_file = Tokenizer.load(tmp_path / "t" / "tokenizer.json")  # a file path reads the config beside it
    assert from_file.chat_template == custom.chat_template
    retrained = train_bpe(["different text entirely"] * 20, vocab_size=300, show_progress=False)
    assert retrained.sha256 != tok.sha256


def test_load_hugging_face_style_directories(tmp_path):
    """A tokenizer.json with other special-token spellings, with and without a tokenizer_config.json."""
    hf = byte_level_bpe(["<s>", "</s>", "<unk>"])
    (tmp_path / "bare").mkdir()
    hf.save(str(tmp_path / "bare" / "tokenizer.json"))
    bare = Tokenizer.load(tmp_path / "bare")
    assert (bare.bos_id, bare.eos_id, bare.pad_id) == (0, 1, None)

    (tmp_path / "cfg").mkdir()
    hf.save(str(tmp_path / "cfg" / "tokenizer.json"))
    (tmp_path / "cfg" / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "pad_token": "<unk>",
        "chat_template": [{"name": "tool_use", "template": "tool"},
                          {"name": "default", "template": "{{ bos_token }}"}],
    }))
    cfg = Tokenizer.load(tmp_path / "cfg")
    assert (cfg.bos_id, cfg.eos_id, cfg.pad_id) == (0, 1, 2)
    assert cfg.apply_chat_template([]) == "<s>"

    (tmp_path / "jinja").mkdir()
    hf.save(str(tmp_path / "jinja" / "tokenizer.json"))
    (tmp_path / "jinja" / "chat_template.jinja").write_text("{{ messages | length }}")
    assert Tokenizer.load(tmp_path / "jinja").apply_chat_template([{"role": "user", "content": "x"}]) == "1"


def test_load_errors_are_one_line(tmp_path):
    cases = {tmp_path / "missing": "tokenizer not found", tmp_path: "no tokenizer.json in"}
    (tmp_path / "broken.json").write_text('{"model": 3}')
    cases[tmp_path / "broken.json"] = "not a valid tokenizer.json"
    for path, expected in cases.items():
        with pytest.raises(LmforgeError, match=expected) as e:
            Tokenizer.load(path)
        assert "\n" not in str(e.value)
    (tmp_path / "d").mkdir()
    byte_level_bpe().save(str(tmp_path / "d" / "tokenizer.json"))
    (tmp_path / "d" / "tokenizer_config.json").write_text('{"bos_token": "<s>",\n oops}')
    with pytest.raises(LmforgeError, match=r"tokenizer_config\.json: invalid JSON at line 2"):
        Tokenizer.load(tmp_path / "d")


def test_default_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    expected = ("<|end_of_text|><|system|>\nBe brief.<|end|>\n<|user|>\nHi?<|end|>\n<|assistant|>\nHello.<|end|>\n"
                "<|user|>\nBye<|end|>\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    prompt = tok.apply_chat_template(messages)
    assert prompt == expected + "<|assistant|>\n"
    ids = tok.encode(prompt)
    assert ids[:2] == [tok.eos_id, tok.tk.token_to_id("<|system|>")]  # chat tokens encode as single special ids
    assert ids.count(tok.tk.token_to_id("<|end|>")) == 4
    with pytest.raises(LmforgeError, match="unknown chat role robot"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(LmforgeError, match="list of"):
        tok.apply_chat_template([{"content": "no role"}])


def test_stream_decoder_concatenation_equals_decode(tok):
    for text in UNICODE_SAMPLES[:6]:
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
        for skip in (True, False):
            stream = StreamDecoder(tok, skip_special_tokens=skip)
            pieces = [stream.push(i) for i in ids]
            assert "".join(pieces) + stream.flush() == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in p for p in pieces)
    stream = StreamDecoder(tok)
    emoji = tok.encode("😀")
    assert len(emoji) > 1  # a 4-byte character over several byte-level tokens ...
    assert [stream.push(i) for i in emoji] == [""] * (len(emoji) - 1) + ["😀"]  # ... is emitted once whole
    stream.push(emoji[0])
    assert stream.flush() == "\ufffd"  # an unfinished character is only given up at the end


def test_train_rejects_bad_sizes():
    with pytest.raises(LmforgeError, match="vocab_size 100 is too small"):
        train_bpe(["x"], vocab_size=100)
    with pytest.raises(LmforgeError, match="min_frequency"):
        train_bpe(["x"], vocab_size=300, min_frequency=0)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_saved_tokenizer_loads_in_transformers_with_same_ids(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in UNICODE_SAMPLES:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    messages = [{"role": "user", "content": "Hi?"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages)


def test_cli_tokenizer_train(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    text = corpus_text()
    corpus.write_text("".join(json.dumps({"text": text[i:i + 2000]}) + "\n" for i in range(0, 100_000, 2000)))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--output", str(out), "--vocab_size", "400",
                 "--max_docs", "30"]) == 0
    printed = capsys.readouterr().out
    assert "trained on 30 documents" in printed and "bytes/token" in printed
    loaded = Tokenizer.load(out)
    assert loaded.vocab_size == 400
    assert loaded.decode(loaded.encode(text[:1000])) == text[:1000]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "oops"\n')
    assert main(["tokenizer", "train", "--input", str(bad), "--output", str(tmp_path / "t2")]) != 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lmforge: error:")]  # not progress
    assert len(errors) == 1 and f"{bad}:2: malformed JSON" in errors[0]
    assert "Traceback" not in err
    assert main(["tokenizer", "train", "--output", str(tmp_path / "t3")]) != 0
    assert "no input" in capsys.readouterr().err
