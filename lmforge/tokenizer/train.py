"""Train a byte-level BPE / WordPiece / Unigram tokenizer with fixed special-token ids (`lmforge tokenizer train`)."""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError, os_errors
from lmforge.core.files import dir_lock
from lmforge.data.readers import read_documents
from lmforge.tokenizer import (
    CHAT_TOKENS,
    GPT4_SPLIT_PATTERN,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    UNK_TOKEN,
    Tokenizer,
    TokenizerModel,
    _compile_template,
)


def byte_level_bpe(special_tokens: Sequence[str] = ()) -> tokenizers.Tokenizer:
    """An untrained byte-level BPE: GPT-4 regex split, then bytes mapped to printable characters.

    No normalizer: every string round-trips exactly, whatever its Unicode.
    """
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(special_tokens))
    return tk


def default_special_tokens(extra: Sequence[str] = ()) -> list[str]:
    """bos, eos, pad, then the chat tokens, then extras: fixed low ids 0, 1, 2, ..."""
    return list(dict.fromkeys([*SPECIAL_TOKENS.values(), *CHAT_TOKENS, *extra]))


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              extra_special_tokens: Sequence[str] = (), show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE (Sennrich et al. 2016, on bytes as in GPT-2) with all 256 bytes in the
    initial alphabet, so no input is ever out of vocabulary."""
    return train_tokenizer(texts, "bpe", vocab_size, min_frequency, extra_special_tokens, show_progress)


def wordpiece() -> tokenizers.Tokenizer:
    """An untrained BERT-style WordPiece: split on whitespace and punctuation, `##` continuation pieces.

    Lossy by design: whitespace is not kept (decode joins words with single spaces and re-attaches
    punctuation), control characters are dropped, CJK characters become single-character words, and
    a word holding any character unseen in training becomes one unk token.
    """
    tk = tokenizers.Tokenizer(models.WordPiece(unk_token=UNK_TOKEN))
    tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                               lowercase=False)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tk


def unigram() -> tokenizers.Tokenizer:
    """An untrained SentencePiece-style Unigram LM tokenizer (Kudo 2018): spaces become U+2581 and are part of
    the pieces. No dummy prefix space is added (SentencePiece's default drops a leading space on decode), so
    text whose characters were seen in training round-trips exactly; an unseen character becomes unk."""
    tk = tokenizers.Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    return tk


def train_tokenizer(texts: Iterable[str], model: TokenizerModel = "bpe", vocab_size: int = 8192,
                    min_frequency: int = 2, extra_special_tokens: Sequence[str] = (),
                    show_progress: bool = True) -> Tokenizer:
    """Train a tokenizer of the given model with HF `tokenizers`' trainer for it.

    The special tokens (bos, eos, pad, chat tokens, extras; plus `<|unk|>` for WordPiece and Unigram)
    take the fixed low ids 0, 1, 2, ..., whatever the model, so chat rendering and shard eos ids agree.
    """
    if model not in ("bpe", "wordpiece", "unigram"):
        raise LmforgeError(f"unknown tokenizer model {model!r} (expected bpe, wordpiece or unigram)")
    if min_frequency < 1:
        raise LmforgeError(f"min_frequency must be >= 1, got {min_frequency}")
    special = default_special_tokens(extra_special_tokens if model == "bpe" else [*extra_special_tokens, UNK_TOKEN])
    if model == "bpe":
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(special):
            raise LmforgeError(f"vocab_size {vocab_size} is too small: the byte alphabet and special tokens "
                               f"alone need {len(alphabet) + len(special)}")
        tk = byte_level_bpe()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
                                      initial_alphabet=alphabet, show_progress=show_progress)
    elif vocab_size <= len(special):
        raise LmforgeError(f"vocab_size {vocab_size} is too small: the {len(special)} special tokens alone "
                           f"need {len(special)}")
    elif model == "wordpiece":
        tk = wordpiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=special, show_progress=show_progress)
    else:  # unigram has no merge counts: min_frequency does not apply
        tk = unigram()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token=UNK_TOKEN,
                                          show_progress=show_progress)
    tk.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tk, special_tokens=dict(SPECIAL_TOKENS))


# ------------------------------------------------------------------------------------------------
# `lmforge tokenizer train`


@dataclass
class TokenizerTrainConfig:
    input: list[str] = option(default_factory=list, help="text/JSONL files or directories to train on")
    output: str = option("tokenizer", help="directory to write tokenizer.json and tokenizer_config.json to")
    model: TokenizerModel = option("bpe", help="bpe: byte-level BPE, lossless; wordpiece: BERT-style, lossy "
                                   "(whitespace normalized, unseen characters -> <|unk|>); unigram: "
                                   "SentencePiece-style, lossless for characters seen in training")
    vocab_size: int = option(8192, help="vocabulary size, special tokens included")
    min_frequency: int = option(2, help="a pair must occur this often to be merged (bpe, wordpiece)")
    special_tokens: list[str] = option(default_factory=list, help="extra special tokens, after the built-in "
                                       "bos/eos/pad and chat tokens (fixed ids from 0)")
    chat_template: str = option("", help="a Jinja chat template file to store with the tokenizer "
                                "(default: lmforge's <|role|> template)")
    text_field: str = option("text", help="JSONL field holding the text")
    max_docs: int = option(0, help="train on at most this many documents (0 = all)")


SAMPLE_BYTES = 1_000_000  # text kept aside to report bytes/token




def train_tokenizer_cmd(cfg: TokenizerTrainConfig) -> int:
    """Train on the input documents, save, and report the vocabulary and bytes/token on a sample."""

    if not cfg.input:
        raise LmforgeError("tokenizer train: no input; pass --input FILE_OR_DIR [...]")
    if cfg.max_docs < 0:
        raise LmforgeError(f"max_docs must be >= 0, got {cfg.max_docs}")
    template = None
    if cfg.chat_template:
        try:
            template = Path(cfg.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LmforgeError(f"chat template {cfg.chat_template}: cannot read ({e.__class__.__name__})") from None
        _compile_template(template)  # a syntax error is reported now, not at the first chat
    with dir_lock(cfg.output):  # one owner: a second `tokenizer train` into this output is refused
        return _train_and_save(cfg, template)


def _train_and_save(cfg: TokenizerTrainConfig, template: str | None) -> int:
    docs = read_documents(cfg.input, text_field=cfg.text_field)
    if cfg.max_docs:
        docs = itertools.islice(docs, cfg.max_docs)
    seen = {"docs": 0, "bytes": 0}
    sample: list[str] = []

    def texts() -> Iterator[str]:
        sampled = 0
        for doc in docs:
            if not doc.text:
                continue
            n_bytes = len(doc.text.encode("utf-8"))
            seen["docs"] += 1
            seen["bytes"] += n_bytes
            if sampled < SAMPLE_BYTES:
                sample.append(doc.text)
                sampled += n_bytes
            yield doc.text

    with os_errors():
        trained = train_tokenizer(texts(), cfg.model, cfg.vocab_size, cfg.min_frequency, cfg.special_tokens)
    if not seen["docs"]:
        raise LmforgeError(f"tokenizer train: no text found in {', '.join(cfg.input)}")
    tokenizer = Tokenizer(trained.tk, chat_template=template, special_tokens=trained.special_tokens)
    out = tokenizer.save(cfg.output)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(sample))
    n_sample_bytes = sum(len(t.encode("utf-8")) for t in sample)
    print(f"trained on {seen['docs']} documents ({seen['bytes'] / 1e6:.1f} MB); "
          f"saved {out / TOKENIZER_FILE} (sha256 {tokenizer.sha256[:12]})")
    print(f"{cfg.model} vocab size {tokenizer.vocab_size}; {n_sample_bytes / max(n_tokens, 1):.2f} bytes/token "
          f"on a {n_sample_bytes / 1e6:.2f} MB sample of the training text")
    if tokenizer.vocab_size < cfg.vocab_size:
        print(f"note: the corpus supports only {tokenizer.vocab_size} of the {cfg.vocab_size} requested "
              f"tokens at min_frequency={cfg.min_frequency}")
    return 0
