"""`lmforge chat`: a terminal conversation with a checkpoint, streamed token by token.

Each turn renders the whole history with the tokenizer's chat template, exactly as SFT encodes
a prompt (`lmforge.tokenizer.chat.prompt_ids`), and samples until the end-of-turn token.
Lines come from stdin, so a conversation can be piped in (that is how it is tested):

    printf 'hello\\n/settings temperature=0\\nhello\\n/quit\\n' | lmforge chat --checkpoint DIR

Commands: `/reset` forgets the history, `/settings [key=value ...]` changes and prints the
sampling settings (temperature, top_k, top_p, max_new_tokens, seed; also min_p, repetition_penalty,
frequency_penalty, presence_penalty, no_repeat_ngram_size), `/quit` (or end of input) leaves.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

from torch import nn

from lmforge.core.config import coerce, option, suggest
from lmforge.core.errors import LmforgeError
from lmforge.core.runtime import resolve_device
from lmforge.generate.engine import Strategy, generate_stream
from lmforge.generate.sampling import SamplingParams
from lmforge.model.quant import QUANTIZE_HELP, Quantize, apply_quantize
from lmforge.peft.config import load_trained
from lmforge.tasks.reasoning import ThinkSplitter
from lmforge.tokenizer import StreamDecoder, Tokenizer
from lmforge.tokenizer.chat import prompt_ids, stop_token_ids

SETTINGS = ("temperature", "top_k", "top_p", "max_new_tokens", "seed")
EXTRA_SETTINGS = ("min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "no_repeat_ngram_size")
HELP = ("commands: /reset (forget the conversation), /settings [key=value ...] ("
        + ", ".join(SETTINGS + EXTRA_SETTINGS) + "), /quit")


def apply_settings(params: SamplingParams, text: str) -> SamplingParams:
    """`params` with `key=value` pairs from `text` applied; a bad key or value is one LmforgeError line."""
    changes = {}
    hints = typing.get_type_hints(SamplingParams)
    for part in text.split():
        key, sep, value = part.partition("=")
        if not sep:
            raise LmforgeError(f"/settings: expected key=value, got '{part}'")
        if key not in SETTINGS + EXTRA_SETTINGS:
            hint = suggest(key, SETTINGS + EXTRA_SETTINGS)
            raise LmforgeError(f"/settings: unknown setting '{key}'" + (f" (did you mean '{hint}'?)" if hint else "")
                               + f"; choose from {', '.join(SETTINGS + EXTRA_SETTINGS)}")
        changes[key] = coerce(value, hints[key], key)
    return dataclasses.replace(params, **changes)  # __post_init__ checks the ranges again


def describe(params: SamplingParams) -> str:
    """The main settings, plus any penalty or min-p setting that is not at its default."""
    default = SamplingParams()
    extra = [k for k in EXTRA_SETTINGS if getattr(params, k) != getattr(default, k)]
    return "settings: " + " ".join(f"{k}={getattr(params, k)}" for k in (*SETTINGS, *extra))


class ChatSession:
    """A conversation: the message history and the sampling settings."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, params: SamplingParams, system: str = "") -> None:
        self.model, self.tokenizer, self.params, self.system = model, tokenizer, params, system
        self.stop_ids = stop_token_ids(tokenizer)
        self.messages: list[dict[str, str]] = []
        self.turns = 0

    def reset(self) -> None:
        self.messages = []

    def _conversation(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def prompt_ids(self) -> list[int]:
        """The history as the model reads it; the oldest exchanges are dropped until there is room to answer."""

        room = self.model.cfg.max_seq_len - min(self.params.max_new_tokens, self.model.cfg.max_seq_len // 2)
        ids = prompt_ids(self.tokenizer, self._conversation())
        while len(ids) > room and len(self.messages) > 2:
            self.messages = self.messages[2:]  # forget the oldest user + assistant turns
            ids = prompt_ids(self.tokenizer, self._conversation())
        return ids

    def reply(self, text: str, write: Callable[[str], None]) -> str:
        """Add a user turn, stream the assistant's answer through `write`, keep it in the history."""
        self.messages.append({"role": "user", "content": text})
        seed = None if self.params.seed is None else self.params.seed + self.turns
        params = dataclasses.replace(self.params, seed=seed, stop_token_ids=[*self.params.stop_token_ids,
                                                                             *self.stop_ids])
        decoder, shown = StreamDecoder(self.tokenizer), ThinkShown(write)
        pieces = []
        for token in generate_stream(self.model, self.prompt_ids(), Strategy(sampling=params)):
            pieces.append(decoder.push(token))
            shown.write(pieces[-1])
        pieces.append(decoder.flush())
        shown.write(pieces[-1])
        shown.finish()
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": answer})
        self.turns += 1
        return answer


class ThinkShown:
    """Writes a streamed answer with its thinking apart: `[thinking] ...` then `[answer] ...` (a reply without
    a `<think>` section is written as it is)."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.out, self.splitter, self.part = write, ThinkSplitter(), ""

    def write(self, text: str) -> None:
        self._show(*self.splitter.feed(text))

    def finish(self) -> None:
        self._show(*self.splitter.finish())

    def _show(self, reasoning: str, content: str) -> None:
        for part, text in (("thinking", reasoning), ("answer", content)):
            if not text:
                continue
            if self.splitter.thought and part != self.part:
                self.out(("\n" if self.part else "") + f"[{part}] ")
                self.part = part
            self.out(text)


def chat_loop(session: ChatSession, lines: Iterable[str], out: TextIO, prompt: str = "") -> int:
    """Read user lines until /quit or the end of input; returns the number of answers given."""
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    answers = 0
    write(prompt)
    for raw in lines:
        line = raw.rstrip("\n")
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            session.reset()
            write("(conversation reset)\n")
        elif line.strip().startswith("/settings"):
            try:
                session.params = apply_settings(session.params, line.strip()[len("/settings"):])
                write(describe(session.params) + "\n")
            except LmforgeError as e:
                write(f"error: {e}\n")
        elif line.strip().startswith("/"):
            write(f"unknown command {line.split()[0]}; {HELP}\n")
        elif line.strip():
            write("assistant: ")
            session.reply(line.strip(), write)
            write("\n")
            answers += 1
        write(prompt)
    return answers


def _sampling() -> SamplingParams:
    """`SamplingParams`' own defaults, the ones generate and the server's API use too."""
    return SamplingParams()


@dataclass
class ChatConfig:
    checkpoint: str = option(help="model directory (config.json + model.safetensors + tokenizer.json)")
    adapter: str = option("", "PEFT adapter directory to apply on top of the checkpoint")
    tokenizer: str = option("", "tokenizer directory; empty uses the checkpoint's")
    system: str = option("", "system message put before the conversation")
    sampling: SamplingParams = option(default_factory=_sampling, help="how answers are sampled (the n-th answer "
                                                                      "uses seed + n); /settings changes it")
    quantize: Quantize = option("none", QUANTIZE_HELP)
    device: str = option("auto", "auto, cpu, cuda, ...")


def chat_cmd(cfg: ChatConfig) -> int:

    model = load_trained(cfg.checkpoint, cfg.adapter or None, device=str(resolve_device(cfg.device)))
    apply_quantize(model, cfg.quantize, adapter=bool(cfg.adapter))
    tokenizer = Tokenizer.load(cfg.tokenizer or cfg.checkpoint)
    params = cfg.sampling
    session = ChatSession(model, tokenizer, params, cfg.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"lmforge chat with {cfg.checkpoint}" + (f" + {cfg.adapter}" if cfg.adapter else ""))
        print(describe(params))
        print(HELP)
    chat_loop(session, sys.stdin, sys.stdout, prompt="you: " if interactive else "")
    return 0
