"""Tokenizers: train byte-level BPE / WordPiece / Unigram, load/save `tokenizer.json`, encode/decode, chat templates.

The Rust `tokenizers` library does the work; `tokenizer.json` (+ `tokenizer_config.json` for the
special tokens and the chat template) is the ecosystem format, so a tokenizer trained here loads
in `transformers`, and a Hugging Face model directory's tokenizer loads here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import tokenizers

from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json, atomic_write_text, read_json_object
from lmforge.tokenizer.templates import builtin_template

SPECIAL_TOKENS = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|pad|>"}
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
UNK_TOKEN = "<|unk|>"  # WordPiece and Unigram map characters never seen in training to it
TokenizerModel = Literal["bpe", "wordpiece", "unigram"]

# The GPT-4 (cl100k_base) pre-tokenizer regex, also Llama 3's: contractions, letter runs with at most
# one leading non-letter, digit groups of at most 3, punctuation runs, and whitespace kept apart so
# merges never cross those categories (tiktoken_ext/openai_public.py).
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}"""
                      r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")

# Each role's message is "<|role|>\n{content}<|end|>\n"; the generation prompt opens an assistant turn. The
# conversation starts with eos, as every document in the pretraining shards follows one (see `sequence_start`).
DEFAULT_CHAT_TEMPLATE = (
    "{{- eos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role ' ~ message['role'] ~ ' (expected system, user, assistant)') -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}{{- message['content'] ~ '<|end|>\\n' -}}"
    "{%- endgeneration -%}{%- else -%}{{- message['content'] ~ '<|end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
# The default before sequence starts were written down (lmforge then put bos outside the template): a tokenizer
# saved with it gets the current default on load, so its chats start as pretraining documents do.
_LEGACY_DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role ' ~ message['role'] ~ ' (expected system, user, assistant)') -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# Private-use characters around the text of a template's `{% generation %}` blocks while rendering.
GENERATION_START, GENERATION_END = "\U000f0010", "\U000f0011"

GIL_FREE_CHARS = 20_000  # texts longer than this are encoded without holding the GIL (see `encode`)
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
        if chat_template == _LEGACY_DEFAULT_CHAT_TEMPLATE:
            chat_template = DEFAULT_CHAT_TEMPLATE
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
        if template is None:  # an HF checkpoint without one: the built-in template of its family, if known
            template = builtin_template(tk)
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

    @functools.cached_property
    def declared_start(self) -> list[int]:
        """The ids the tokenizer's own post-processor puts before a text (Llama's bos, BERT's [CLS]); [] if none."""
        for probe in ("x", "a", "0", "hello", "."):  # a text that encodes to something, to see what comes before
            plain = self.tk.encode(probe, add_special_tokens=False).ids
            if plain:
                full = self.tk.encode(probe, add_special_tokens=True).ids
                return next((full[:i] for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain),
                            [])
        return []

    @property
    def sequence_start(self) -> list[int]:
        """What starts every sequence the model reads (the rule is written in `lmforge.tokenizer.chat`): the
        post-processor's prefix where the tokenizer declares one, else eos, the document separator of the
        pretraining shards (every document there follows an eos); [] for a tokenizer with neither."""
        declared = self.declared_start
        if declared:
            return declared
        return [] if self.eos_id is None else [self.eos_id]

    @functools.cached_property
    def control_pattern(self) -> re.Pattern[str] | None:
        """Matches the special added tokens (longest first, so a token wins over one it contains); None if none."""
        tokens = sorted((t.content for t in self.tk.get_added_tokens_decoder().values() if t.special),
                        key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens))) if tokens else None

    @functools.cached_property
    def plain_tk(self) -> tokenizers.Tokenizer:
        """The same tokenizer reading every special token's text as plain characters (a copy, so the flag never
        changes how `tk` reads text in another thread)."""
        tk = tokenizers.Tokenizer.from_str(self.tk.to_str())
        tk.encode_special_tokens = True
        return tk

    def _require(self, role: str) -> int:
        token_id = self.token_id(role)
        if token_id is None:
            raise LmforgeError(f"this tokenizer has no {role} token")
        return token_id

    # -- encode / decode ----------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; bos/eos only when asked (a stored post-processor is not applied).

        A long text goes through the batch path, which releases the GIL while Rust works (`encode` holds
        it): the server tokenizes a long prompt in a thread while its event loop keeps answering."""
        if len(text) > GIL_FREE_CHARS:
            ids = self.tk.encode_batch_fast([text], add_special_tokens=False)[0].ids
        else:
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

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render [{"role", "content"}, ...] with the Jinja chat template, as transformers does; `tools` (OpenAI
        function specs) are passed to templates that render them, as transformers passes them."""
        text = self.render_marked(messages, add_generation_prompt, tools)
        return text.replace(GENERATION_START, "").replace(GENERATION_END, "")

    def render_marked(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                      tools: list[dict[str, Any]] | None = None) -> str:
        """The rendered template with each `{% generation %}` block's text between GENERATION_START and
        GENERATION_END (`lmforge.tokenizer.chat` reads the assistant spans from them)."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise LmforgeError("chat messages must be a list of {'role': ..., 'content': ...} objects")
        import jinja2

        try:
            extra = {} if tools is None else {"tools": tools}
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **extra,
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

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' mark for what the assistant writes): the block
        renders as its body between two private-use characters."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller: Any) -> str:
            return GENERATION_START + caller() + GENERATION_END

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
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
