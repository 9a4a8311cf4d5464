"""The tiktoken encode path (`lmforge.tokenizer.fast`) gives exactly the HF tokenizer's ids, special-token text
included as plain characters, for tokenizers trained by lmforge and GPT-2-style ones; others fall back to HF."""

from __future__ import annotations

import json

import pytest
import tokenizers
from textdata import PYDOC_ENGLISH
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.data.shards import ShardSet
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer
from lmforge.tokenizer.fast import LLAMA3_SPLIT_PATTERN, TextEncoder, tiktoken_encoding
from lmforge.tokenizer.pack import tokenize_to_shards
from lmforge.tokenizer.train import byte_level_bpe, train_tokenizer

VARIED = [
    "",
    "Hello, world! It's a test: don't WE'LL they've I'M you'RE",
    "numbers 1 12 123 1234 12345 3.14159 -42 1e10 0x1F 2026-12-06 10,000,000 ١٢٣ ²³",
    "spaces   runs\t\ttabs \n\n\nnewlines\r\nwindows\r\r  trailing   \n  \u00a0nbsp\u3000ideographic\u2003em ",
    "    indented code:\n        def f(x):\n            return x ** 2  # comment\n\n\n\t\tmixed\n",
    "unicode: héllo naïve café Ünïcödé ß Straße ελληνικά русский текст עברית العربية हिन्दी",
    "CJK 日本語のテキスト 中文文本 한국어 텍스트 and emoji 😀👍🏽👨‍👩‍👧 flags 🇫🇷🇩🇪",
    "combining e\u0301 a\u0308 zero\u200bwidth joiner\u200d soft\u00adhyphen bidi\u202eoverride\u202c",
    "control \x00\x01\x07\x1b[31m chars \x7f and private \ue000 and astral \U0001f9ea \U00010348",
    "special tokens as text: <|begin_of_text|> <|end_of_text|><|pad|> <|user|>hi<|end|> <|endoftext|>",
    "punctuation!!! ??? ... --- *** ((( ))) [[]] {{}} <<>> ''' \"\"\" ``` ~~~ @@@ ### $$$ %%% ^^^ &&&",
    "a" * 3000 + " " + "ab" * 500 + " " + " " * 300 + "x",
    "mixedCASE camelCase snake_case kebab-case SCREAMING_CASE path/to/file.py https://example.com/a?b=c&d=e",
]


def corpus() -> list[str]:
    text = PYDOC_ENGLISH.read_text(encoding="utf-8")
    return [text[i:i + 2000] for i in range(0, min(len(text), 400_000), 2000)]


def texts() -> list[str]:
    body = PYDOC_ENGLISH.read_text(encoding="utf-8")[:20_000]
    return VARIED + [body, body.upper(), body.replace(" ", "  ")]


def gpt2_style() -> tokenizers.Tokenizer:
    """GPT-2's layout: byte-level regex inside ByteLevel, the 256 bytes first, `<|endoftext|>` as the last id."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(corpus(), trainer)
    tk.add_special_tokens(["<|endoftext|>"])
    return tk


def llama3_style(tokenizer: Tokenizer) -> str:
    """Llama 3's spelling of the split regex, and its `ignore_merges` (a piece that is a token is that token)."""
    spec = json.loads(tokenizer.canonical_json())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = LLAMA3_SPLIT_PATTERN
    spec["model"]["ignore_merges"] = True
    return json.dumps(spec)


@pytest.fixture(scope="module")
def lmforge_bpe() -> Tokenizer:
    return train_tokenizer(corpus(), "bpe", vocab_size=1000, show_progress=False)


def hf_plain_ids(tokenizer_json: str, batch: list[str]) -> list[list[int]]:
    tk = tokenizers.Tokenizer.from_str(tokenizer_json)
    tk.encode_special_tokens = True
    return [tk.encode(t, add_special_tokens=False).ids for t in batch]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["lmforge", "gpt2", "llama3"])
def test_tiktoken_path_gives_the_hf_ids(kind, threads, lmforge_bpe):
    tokenizer_json = {"lmforge": lmforge_bpe.canonical_json, "gpt2": lambda: gpt2_style().to_str(),
                      "llama3": lambda: llama3_style(lmforge_bpe)}[kind]()
    encoder = TextEncoder(tokenizer_json, threads=threads)
    assert encoder.tiktoken is not None  # the fast path, not the fallback
    batch = texts()
    ours = [ids.tolist() for ids in encoder.encode_batch(batch)]
    expected = hf_plain_ids(tokenizer_json, batch)
    for text, got, want in zip(batch, ours, expected):
        assert got == want, text[:80]
    specials = {t.content for t in tokenizers.Tokenizer.from_str(tokenizer_json).get_added_tokens_decoder().values()}
    special_ids = {tokenizers.Tokenizer.from_str(tokenizer_json).token_to_id(s) for s in specials}
    assert not special_ids & {i for ids in ours for i in ids}  # their text never became a control token


def test_unrepresentable_tokenizers_fall_back_to_hf(lmforge_bpe):
    spec = json.loads(lmforge_bpe.canonical_json())
    spec["normalizer"] = {"type": "NFKC"}
    spec["model"]["dropout"] = None
    normalized = json.dumps(spec)
    digits = json.loads(lmforge_bpe.canonical_json())
    digits["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}"  # a regex that is not total
    others = [normalized, json.dumps(digits),
              train_tokenizer(corpus()[:50], "wordpiece", vocab_size=300, show_progress=False).canonical_json(),
              train_tokenizer(corpus()[:50], "unigram", vocab_size=300, show_progress=False).canonical_json()]
    for tokenizer_json in others:
        assert tiktoken_encoding(tokenizer_json) is None
        encoder = TextEncoder(tokenizer_json)
        batch = [t for t in VARIED if "\x00" not in t]
        assert [ids.tolist() for ids in encoder.encode_batch(batch)] == hf_plain_ids(tokenizer_json, batch)


def byte_bpe(merges: list[tuple[str, str]]) -> str:
    """tokenizer.json of lmforge's byte-level BPE with the 256 bytes and these merges."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tk = byte_level_bpe()
    tk.model = models.BPE(vocab, merges)
    return tk.to_str()


def test_a_merge_order_tiktoken_cannot_follow_falls_back():
    """tiktoken merges any adjacent pair whose bytes form a token; HF only the listed pairs. With merges a+b,
    b+c, a+bc the text "abc" is "ab" "c" in HF (no ab+c merge) but "abc" in tiktoken: refused, HF is used."""
    consistent = byte_bpe([("a", "b"), ("ab", "c")])
    assert tiktoken_encoding(consistent) is not None
    text = ["abc abcab"]
    assert TextEncoder(consistent).encode_batch(text)[0].tolist() == hf_plain_ids(consistent, text)[0]
    inconsistent = byte_bpe([("a", "b"), ("b", "c"), ("a", "bc")])
    assert tiktoken_encoding(inconsistent) is None
    ab_c = hf_plain_ids(inconsistent, ["abc"])[0]
    assert len(ab_c) == 2 and TextEncoder(inconsistent).encode_batch(["abc"])[0].tolist() == ab_c


def test_pack_reads_special_token_text_as_plain_characters(tmp_path, lmforge_bpe):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in VARIED[1:]), encoding="utf-8")
    tokenize_to_shards([docs], lmforge_bpe, tmp_path / "out", val_fraction=0.0)
    shards = ShardSet(tmp_path / "out" / "train")
    tokens = shards.read(0, len(shards))
    eos = lmforge_bpe.eos_id
    assert int((tokens == eos).sum()) == len(VARIED) - 1  # one per document: the text's own never counts
    assert lmforge_bpe.token_id("bos") not in tokens.tolist()
    assert SPECIAL_TOKENS["eos"] in VARIED[9]
