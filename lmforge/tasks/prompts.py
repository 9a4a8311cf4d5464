"""Prompts with optional reference answers: what RL stages sample from and verifiers check against.

A prompt file is JSONL (or a JSON array) in any conversation format `lmforge.data.formats` reads (alpaca,
sharegpt, chat, oasst, flan, self-instruct): the prompt is every message before the last assistant turn, and
that turn is the reference answer. A prompt-only form is read too: {"prompt": str | messages, "answer": ...}
(TRL's prompt-only datasets; "answer" optional). A record's own "answer" field, when present, is the reference
in every format. The whole record travels with the example, so a user reward function or a field-reading
verifier (a per-example "regex" or "schema") sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data.formats import CONVERSATION_FORMATS, Message, chat_messages, detect_conversation_format, iter_records
from lmforge.data.readers import BadRecord
from lmforge.tasks.suite import TaskExample

PROMPT_FORMATS = ("auto", "prompt", *CONVERSATION_FORMATS)


@dataclass
class PromptExample:
    messages: list[Message]  # the prompt; its last message is the user's
    answer: str = ""  # the reference answer ("" when the record has none)
    record: dict[str, Any] = field(default_factory=dict)  # the record as read
    source: str = ""  # "file:line"

    @property
    def prompt(self) -> str:
        """The text of the last user message (what a reward function is usually about)."""
        return self.messages[-1]["content"]


def task_prompts(examples: list[TaskExample], tag: str = "task") -> list[PromptExample]:
    """Synthetic task-suite examples as prompts whose reference is the exact answer."""
    return [PromptExample([{"role": "user", "content": e.prompt}], e.answer,
                          {"kind": e.kind, "prompt": e.prompt, "answer": e.answer}, f"{tag}:{e.kind}:{i}")
            for i, e in enumerate(examples)]


def prompt_messages(record: dict[str, Any], source: str) -> list[Message]:
    """{"prompt": "text"} or {"prompt": [messages]} -> messages."""
    prompt = record.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return chat_messages({"messages": prompt}, source)
    raise BadRecord(source, "field 'prompt' must be a non-empty string or list of messages")


def _answer(record: dict[str, Any], source: str) -> str | None:
    if "answer" not in record or record["answer"] is None:
        return None
    value = record["answer"]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRecord(source, f"field 'answer' must be a string or a number, got {type(value).__name__}")
    return str(value)


def parse_prompt(record: dict[str, Any], source: str, format: str = "auto") -> PromptExample:
    """One record as a prompt and its reference answer (see the module docstring)."""
    if format == "prompt" or format == "auto" and isinstance(record.get("prompt"), (str, list)):
        messages = prompt_messages(record, source)
    else:
        kind = format if format != "auto" else detect_conversation_format(record, source)
        messages = CONVERSATION_FORMATS[kind](record, source)
    answer = _answer(record, source)
    if messages[-1]["role"] == "assistant":
        last = messages.pop()
        answer = last["content"] if answer is None else answer
    if not messages or messages[-1]["role"] != "user":
        raise BadRecord(source, "the prompt must end with a user message (before the reference answer)")
    return PromptExample(messages, answer or "", record, source)


def read_prompts(path: str | Path, format: str = "auto") -> list[PromptExample]:
    """Every record of `path` (file or directory) as a `PromptExample`; a bad one is a one-line error naming
    its file:line."""
    if format not in PROMPT_FORMATS:
        raise BadRecord(str(path), f"unknown prompt format {format!r}; choose one of {', '.join(PROMPT_FORMATS)}")
    return [parse_prompt(record, source, format) for source, record in iter_records(path)]
