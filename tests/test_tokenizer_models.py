"""WordPiece / Unigram / BPE training, Hugging Face directories, and `lmforge tokenizer eval`."""

import importlib.util
import json

import pytest
from textdata import SHAKESPEARE

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.tokenizer import CHAT_TOKENS, SPECIAL_TOKENS, UNK_TOKEN, Tokenizer
from lmforge.tokenizer.eval import compare_tokenizers, format_table
from lmforge.tokenizer.train import train_tokenizer

TEXT = SHAKESPEARE.read_text(encoding="utf-8")[:120_000]
TRAIN, HELD_OUT = TEXT[:100_000], TEXT[100_000:]
CHUNKS = [TRAIN[i:i + 4000] for i in range(0, len(TRAIN), 4000)]
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Tokenizer]:
    """Each model trained, saved and loaded back through lmforge's Tokenizer."""
    out = {}
    for model in ("bpe", "wordpiece", "unigram"):
        tok = train_tokenizer(CHUNKS, model, vocab_size=500, show_progress=False)
        out[model] = Tokenizer.load(tok.save(tmp_path_factory.mktemp(model)))
    return out


@pytest.mark.parametrize("model", ["bpe", "wordpiece", "unigram"])
def test_every_model_has_fixed_special_ids_and_chat_template(trained, model):
    tok = trained[model]
    assert 300 < tok.vocab_size <= 500
    for i, token in enumerate([*SPECIAL_TOKENS.values(), *CHAT_TOKENS]):
        assert tok.tk.token_to_id(token) == i
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert (tok.tk.token_to_id(UNK_TOKEN) is None) == (model == "bpe")  # bpe is byte-level: no unknowns
    prompt = tok.apply_chat_template([{"role": "user", "content": "Good morrow"}])
    ids = tok.encode(prompt)
    assert ids[:2] == [tok.eos_id, tok.tk.token_to_id("<|user|>")] and tok.tk.token_to_id("<|assistant|>") in ids[-2:]
    assert tok.tk.token_to_id("<|end|>") in ids
    assert len(tok.encode(HELD_OUT)) < 0.5 * len(HELD_OUT.encode())  # it learned merges / pieces


def test_round_trips(trained):
    """bpe is exact on any text; unigram on text of seen characters; wordpiece up to whitespace."""
    assert trained["bpe"].decode(trained["bpe"].encode(HELD_OUT)) == HELD_OUT
    assert trained["bpe"].decode(trained["bpe"].encode("日本語 😀\t\r\n")) == "日本語 😀\t\r\n"
    assert trained["unigram"].decode(trained["unigram"].encode(HELD_OUT)) == HELD_OUT
    wp = trained["wordpiece"]
    decoded = wp.decode(wp.encode(HELD_OUT))
    assert decoded != HELD_OUT  # lossy, as documented ...
    assert "".join(decoded.split()) == "".join(HELD_OUT.split())  # ... only in whitespace
    unk = wp.tk.token_to_id(UNK_TOKEN)
    assert wp.encode("Romeo 😀") == [*wp.encode("Romeo"), unk]
    assert trained["unigram"].tk.token_to_id(UNK_TOKEN) in trained["unigram"].encode("😀")


def test_train_rejects_bad_arguments():
    with pytest.raises(LmforgeError, match="unknown tokenizer model 'sentencepiece'"):
        train_tokenizer(["x"], "sentencepiece", 300)
    with pytest.raises(LmforgeError, match="vocab_size 8 is too small"):
        train_tokenizer(["x"], "unigram", 8)


@needs_transformers
def test_transformers_saved_directory_loads_as_is(trained, tmp_path):
    """A directory written by transformers' save_pretrained (a BERT-style WordPiece with [CLS]/[SEP]
    and a post-processor) loads unchanged; ids agree with AutoTokenizer."""
    from transformers import AutoTokenizer, BertTokenizerFast

    vocab = sorted(trained["wordpiece"].tk.get_vocab().items(), key=lambda kv: kv[1])
    vocab_file = tmp_path / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(w for w, _ in vocab if not w.startswith("<|"))]
    vocab_file.write_text("\n".join(words) + "\n", encoding="utf-8")
    bert = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=False)
    bert.chat_template = "{% for m in messages %}[CLS]{{ m['content'] }}[SEP]{% endfor %}"
    bert.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    ours = Tokenizer.load(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    samples = [HELD_OUT[:2000], "Hello, world! It's 2024.", "naïve café 日本", ""]
    for text in samples:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.cls_token_id, hf.sep_token_id, hf.pad_token_id)
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False)

    for model in ("unigram", "wordpiece"):  # and lmforge's own unigram/wordpiece files load in transformers
        trained[model].save(tmp_path / model)
        hf = AutoTokenizer.from_pretrained(str(tmp_path / model))
        assert hf.encode(HELD_OUT[:2000], add_special_tokens=False) == trained[model].encode(HELD_OUT[:2000])


@needs_transformers
def test_llama_style_transformers_directory(tmp_path):
    """A byte-level BPE with <s>/</s> and a bos-adding post-processor, saved by transformers: our ids equal
    AutoTokenizer's, with and without special tokens."""
    from tokenizers import pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from lmforge.tokenizer.train import byte_level_bpe

    tk = byte_level_bpe(["<s>", "</s>", "<unk>"])
    tk.train_from_iterator(CHUNKS, trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>", "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    ours, hf = Tokenizer.load(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id) == (0, 1)
    for text in [HELD_OUT[:3000], "naïve café 😀 日本語", "  leading spaces\n"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_bos=True) == hf.encode(text)
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text, add_special_tokens=False)) == text


def test_compare_tokenizers_counts(trained):
    texts = [HELD_OUT[:5000], "To be, or not to be"]
    results = compare_tokenizers(trained, texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    for model, r in results.items():
        n_tokens = sum(len(trained[model].encode(t)) for t in texts)
        assert (r["n_tokens"], r["n_bytes"], r["n_docs"]) == (n_tokens, n_bytes, 2)
        assert r["bytes_per_token"] == pytest.approx(n_bytes / n_tokens)
        assert r["tokens_per_word"] == pytest.approx(n_tokens / sum(len(t.split()) for t in texts))
        assert r["chars_per_token"] == pytest.approx(sum(map(len, texts)) / n_tokens)
    table = format_table(results).splitlines()
    assert table[0] == "| figure | bpe | wordpiece | unigram |" and len(table) == 2 + 5
    with pytest.raises(LmforgeError, match="no non-empty text"):
        compare_tokenizers(trained, [])


def test_cli_train_all_models_and_eval(tmp_path, capsys):
    corpus = tmp_path / "train.txt"
    corpus.write_text(TRAIN[:40_000], encoding="utf-8")
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": HELD_OUT[i:i + 1000]}) + "\n" for i in range(0, 10_000, 1000)))
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}")
    dirs = []
    for model in ("bpe", "wordpiece", "unigram"):
        dirs.append(str(tmp_path / model))
        assert main(["tokenizer", "train", "--input", str(corpus), "--output", dirs[-1], "--model", model,
                     "--vocab_size", "400", "--special_tokens", "<|tool|>", "--chat_template", str(template)]) == 0
        assert f"{model} vocab size" in capsys.readouterr().out
        tok = Tokenizer.load(dirs[-1])
        assert tok.tk.token_to_id("<|tool|>") == len(SPECIAL_TOKENS) + len(CHAT_TOKENS)
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>hi<|end|>"

    report = tmp_path / "eval.json"
    assert main(["tokenizer", "eval", "--tokenizers", *dirs, "--input", str(held), "--output", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "| figure | bpe | wordpiece | unigram |" in printed and "bytes/token" in printed
    saved = json.loads(report.read_text())
    assert set(saved["results"]) == {"bpe", "wordpiece", "unigram"}
    assert saved["results"]["bpe"]["n_bytes"] == sum(len(HELD_OUT[i:i + 1000].encode()) for i in range(0, 10_000,
                                                                                                       1000))


def test_cli_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "train.txt"
    corpus.write_text(TRAIN[:5000])
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')

    def errors() -> list[str]:
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return [line for line in err.splitlines() if line.startswith("lmforge: error:")]

    assert main(["tokenizer", "train", "--input", str(corpus), "--model", "bytes"]) == 2
    assert errors() == ["lmforge: error: model: 'bytes' is not one of bpe, wordpiece, unigram"]
    assert main(["tokenizer", "train", "--input", str(empty), "--output", str(tmp_path / "t")]) != 0
    assert errors() == [f"lmforge: error: tokenizer train: no text found in {empty}"]
    assert main(["tokenizer", "eval", "--tokenizers", str(tmp_path / "none"), "--input", str(corpus)]) != 0
    assert len(errors()) == 1

    import lmforge.data.readers as readers

    def unreadable(path, *args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(readers, "read_text_file", unreadable)
    assert main(["tokenizer", "train", "--input", str(corpus), "--output", str(tmp_path / "t")]) != 0
    assert errors() == [f"lmforge: error: {corpus}: Permission denied"]
    trained = train_tokenizer(CHUNKS[:3], "bpe", 300, show_progress=False).save(tmp_path / "tok")
    assert main(["tokenizer", "eval", "--tokenizers", str(trained), "--input", str(corpus)]) != 0
    assert errors() == [f"lmforge: error: {corpus}: Permission denied"]
    monkeypatch.undo()
    assert main(["tokenizer", "eval", "--tokenizers", str(trained), "--input", str(empty)]) != 0
    assert errors() == [f"lmforge: error: tokenizer eval: no text found in {empty}"]
