"""Tokenizers: train byte-level BPE / WordPiece / Unigram, load/save `tokenizer.json`, encode/decode, chat templates.

The Rust `tokenizers` library does the work; `tokenizer.json` (+ `tokenizer_config.json` for the
special tokens and the chat template) is the ecosystem format, so a tokenizer trained here loads
in `transformers`, and a Hugging Face model directory's tokenizer loads here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from lmforge.config import option
from lmforge.errors import LmforgeError
from lmforge.files import atomic_write_json, atomic_write_text, read_json_object

SPECIAL_TOKENS = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|pad|>"}
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
UNK_TOKEN = "<|unk|>"  # WordPiece and Unigram map characters never seen in training to it
TokenizerModel = Literal["bpe", "wordpiece", "unigram"]

# The GPT-4 (cl100k_base) pre-tokenizer regex, also Llama 3's: contractions, letter runs with at most
# one leading non-letter, digit groups of at most 3, punctuation runs, and whitespace kept apart so
# merges never cross those categories (tiktoken_ext/openai_public.py).
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}"""
                      r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")

# Each role's message is "<|role|>\n{content}<|end|>\n"; the generation prompt opens an assistant turn.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role ' ~ message['role'] ~ ' (expected system, user, assistant)') -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where recent transformers versions keep the template

# Spellings other tokenizer families use, tried when tokenizer_config.json does not name a role.
_ROLE_CANDIDATES = {
    "bos": (SPECIAL_TOKENS["bos"], "<s>", "<bos>", "[CLS]"),
    "eos": (SPECIAL_TOKENS["eos"], "</s>", "<|endoftext|>", "<eos>", "[SEP]"),
    "pad": (SPECIAL_TOKENS["pad"], "<pad>", "[PAD]"),
}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token roles and chat template a model needs."""

    def __init__(self, tk: tokenizers.Tokenizer, chat_template: str | None = None, *,
                 special_tokens: dict[str, str | None] | None = None) -> None:
        self.tk = tk
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        given = special_tokens or {}
        # role -> token string; a role left out is found among the usual spellings present in the vocab
        self.special_tokens: dict[str, str | None] = {
            role: given[role] if role in given else _first_in_vocab(tk, names)
            for role, names in _ROLE_CANDIDATES.items()
        }

    # -- files ----------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json` file or a directory holding one (lmforge or Hugging Face layout)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise LmforgeError(f"no {TOKENIZER_FILE} in {path}" if path.is_dir() else
                               f"tokenizer not found: {path} (want {TOKENIZER_FILE} or a dir with one)")
        try:
            tk = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception with a serde message
            raise LmforgeError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        config = _read_tokenizer_config(file.parent / TOKENIZER_CONFIG_FILE)
        template = config.get("chat_template")
        jinja_file = file.parent / CHAT_TEMPLATE_FILE
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        special = {role: _token_content(config[f"{role}_token"]) for role in _ROLE_CANDIDATES
                   if f"{role}_token" in config}
        return cls(tk, chat_template=template, special_tokens=special)

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` (atomically) into `directory`; returns it.

        The config uses Hugging Face key names, so `AutoTokenizer.from_pretrained(directory)` works.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / TOKENIZER_FILE, self.canonical_json())
        atomic_write_json(directory / TOKENIZER_CONFIG_FILE, {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.special_tokens["bos"],
            "eos_token": self.special_tokens["eos"],
            "pad_token": self.special_tokens["pad"],
            "clean_up_tokenization_spaces": False,  # byte-level BPE decodes exactly; no space fix-ups
            "chat_template": self.chat_template,
        })
        return directory

    def canonical_json(self) -> str:
        """The serialized tokenizer, exactly as `save` writes it (so its sha256 is the file's)."""
        return self.tk.to_str(pretty=True)

    @property
    def sha256(self) -> str:
        """Identifies the vocabulary and rules (not the chat template); shards and checkpoints record it."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    # -- vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self.tk.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self.token_id("eos")

    @property
    def pad_id(self) -> int | None:
        return self.token_id("pad")

    def _require(self, role: str) -> int:
        token_id = self.token_id(role)
        if token_id is None:
            raise LmforgeError(f"this tokenizer has no {role} token")
        return token_id

    # -- encode / decode ----------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; bos/eos only when asked (a stored post-processor is not applied)."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (parallel in Rust where cores allow)."""
        encodings = self.tk.encode_batch_fast(texts, add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self._require("bos"), *ids]
        if add_eos:
            ids = [*ids, self._require("eos")]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat ----------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render [{"role", "content"}, ...] with the Jinja chat template, as transformers does."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise LmforgeError("chat messages must be a list of {'role': ..., 'content': ...} objects")
        import jinja2

        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.special_tokens["bos"] or "", eos_token=self.special_tokens["eos"] or "",
                pad_token=self.special_tokens["pad"] or "")
        except jinja2.TemplateError as e:
            raise LmforgeError(f"chat template: {e}") from None


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> Any:
    """A sandboxed Jinja template with the helpers Hugging Face chat templates expect; cached, as compiling
    costs ~20 ms and SFT renders every conversation several times to locate the assistant tokens."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LmforgeError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None


def _read_tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    config = read_json_object(path)
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: use the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        config["chat_template"] = named.get("default", next(iter(named.values()), None))
    if config.get("chat_template") is not None and not isinstance(config["chat_template"], str):
        raise LmforgeError(f"{path}: field 'chat_template' must be a string")
    return config


def _first_in_vocab(tk: tokenizers.Tokenizer, tokens: Sequence[str]) -> str | None:
    return next((t for t in tokens if tk.token_to_id(t) is not None), None)


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells a token as a string or as an AddedToken object {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class StreamDecoder:
    """Incremental decode for streaming: feed ids one by one, get the new text (never emits half a
    UTF-8 character; a byte-level BPE token can end mid-character).

    Text is decoded over a short window of ids (`prefix` = already emitted, then the new ones) and
    only the part beyond the prefix is emitted, once it no longer ends in U+FFFD (an incomplete
    character). Decoding with the prefix as context also keeps tokenizers whose tokens render
    differently at the start of a string (SentencePiece's leading space) exact.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_start = 0  # ids[_prefix_start:_read_start] were emitted already (decode context)
        self._read_start = 0  # ids from here on are not emitted yet

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix = self._decode(self._ids[self._prefix_start:self._read_start])
        text = self._decode(self._ids[self._prefix_start:])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        del self._ids[:self._read_start]  # keep only the new prefix window
        self._prefix_start, self._read_start = 0, len(self._ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD); then reset."""
        prefix = self._decode(self._ids[self._prefix_start:self._read_start])
        text = self._decode(self._ids[self._prefix_start:])
        self._ids, self._prefix_start, self._read_start = [], 0, 0
        return text[len(prefix):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""


# ------------------------------------------------------------------------------------------------
# training


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


@contextlib.contextmanager
def os_errors() -> Iterator[None]:
    """Report a file the OS will not read or write (permissions, a device, a full disk) as one line."""
    try:
        yield
    except OSError as e:
        raise LmforgeError(f"{e.filename or 'file'}: {e.strerror or e}") from None


def train_tokenizer_cmd(cfg: TokenizerTrainConfig) -> int:
    """Train on the input documents, save, and report the vocabulary and bytes/token on a sample."""
    from lmforge.data.readers import read_documents

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
