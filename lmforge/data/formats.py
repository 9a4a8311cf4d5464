"""Fine-tuning data formats, read into two representations every post-training stage shares.

- `Conversation`: a list of {"role", "content"} messages (SFT, rejection sampling, Self-Instruct).
  Read from Alpaca (instruction/input/output), ShareGPT (conversations: from/value), OpenAI-style
  chat (messages: role/content), Self-Instruct seed tasks (instruction/instances), OpenAssistant
  trees (text/role/replies, best-ranked path) and FLAN/P3 templated pairs (inputs/targets).
- `PreferencePair`: a prompt (messages) with a chosen and a rejected response (reward model, DPO).
  Read from Anthropic HH-RLHF (full transcripts), Stanford SHP, PKU-SafeRLHF, Stack Exchange paired
  and a plain prompt/chosen/rejected form.

Files are JSONL (one record per line, optionally .gz/.zst) or one JSON array. `format="auto"`
recognizes each record by its keys. Every bad record is one `LmforgeError` naming `file:line` and
the field, so a user can fix the data without a traceback.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.core.errors import LmforgeError
from lmforge.data.readers import BadRecord, decompress_errors, iter_input_files, open_binary

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    messages: list[Message]
    source: str  # "file:line"


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: str
    rejected: str
    source: str
    rating: float | None = None  # how strongly chosen was preferred, in [0, 1] (`preference_rating`); None = unrated


# ----------------------------------------------------------------------------------------------
# records


def iter_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", record) for each object in a JSONL file or a JSON-array file (files or directories)."""
    for file in iter_input_files([path]):
        with open_binary(file) as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):
            yield from _array_records(file)
        else:
            yield from _jsonl_records(file)


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with open_binary(path) as f:
        lines = enumerate(f, 1)
        while True:
            try:
                lineno, raw = next(lines)
            except StopIteration:
                return
            except decompress_errors() as e:
                raise LmforgeError(f"{path}: cannot decompress ({e})") from None
            if raw.strip():
                source = f"{path}:{lineno}"
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise BadRecord(source, "not valid UTF-8") from None
                except json.JSONDecodeError as e:
                    raise BadRecord(source, f"malformed JSON: {e.msg} at column {e.colno}") from None
                yield source, _object(record, source)


def _array_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Elements of a top-level JSON array, each named by the line it starts on."""
    with open_binary(path) as f:
        text = f.read().decode("utf-8", errors="strict")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    decoder, pos, line, lines_at = json.JSONDecoder(), text.index("[") + 1, 1, 0
    for item in items:
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", lines_at, pos)
        lines_at = pos
        _, pos = decoder.raw_decode(text, pos)
        source = f"{path}:{line}"
        yield source, _object(item, source)


def _object(record: Any, source: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise BadRecord(source, f"expected a JSON object, got {type(record).__name__}")
    return record


def _text(record: dict[str, Any], key: str, source: str, *, allow_empty: bool = False,
          required: bool = True) -> str:
    """record[key] as a string; a missing, non-string or empty (unless allowed) field names itself."""
    if key not in record or record[key] is None:
        if required:
            raise BadRecord(source, f"missing field '{key}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(source, f"field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRecord(source, f"field '{key}' is empty")
    return value


# ----------------------------------------------------------------------------------------------
# conversations


def alpaca_messages(record: dict[str, Any], source: str) -> list[Message]:
    """Alpaca (Taori et al. 2023): instruction [+ "\\n\\n" + input] -> output; optional system."""
    instruction = _text(record, "instruction", source)
    extra = _text(record, "input", source, allow_empty=True, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": _text(record, "system", source)}] if record.get("system") else []
    return [*messages, {"role": "user", "content": user},
            {"role": "assistant", "content": _text(record, "output", source)}]


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def self_instruct_messages(record: dict[str, Any], source: str) -> list[Message]:
    """Self-Instruct seed tasks (Wang et al. 2023): instruction + instances[0] {input, output}."""
    instances = record.get("instances")
    if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise BadRecord(source, "field 'instances' must be a non-empty list of {input, output} objects")
    first = instances[0]
    return alpaca_messages({"instruction": record.get("instruction"), "input": first.get("input"),
                            "output": first.get("output")}, source)


def sharegpt_messages(record: dict[str, Any], source: str) -> list[Message]:
    """ShareGPT / Vicuna: "conversations": [{"from": "human"|"gpt"|"system", "value": ...}]."""
    return _message_list(record, source, "conversations", "from", "value", SHAREGPT_ROLES)


def chat_messages(record: dict[str, Any], source: str) -> list[Message]:
    """OpenAI-style chat: "messages": [{"role": ..., "content": ...}] (also what lmforge writes)."""
    return _message_list(record, source, "messages", "role", "content", {r: r for r in ROLES})


def _message_list(record: dict[str, Any], source: str, key: str, role_key: str, text_key: str,
                  roles: dict[str, str]) -> list[Message]:
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise BadRecord(source, f"field '{key}' must be a non-empty list of messages")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord(source, f"field '{where}' must be an object")
        role = turn.get(role_key)
        if role not in roles:
            raise BadRecord(source, f"field '{where}.{role_key}' is {role!r}; expected one of {sorted(roles)}")
        content = turn.get(text_key)
        if not isinstance(content, str) or not content.strip():
            raise BadRecord(source, f"field '{where}.{text_key}' must be a non-empty string")
        messages.append({"role": roles[role], "content": content})
    return messages


def oasst_messages(record: dict[str, Any], source: str) -> list[Message]:
    """An OpenAssistant message tree (prompter/assistant nodes with "replies"): the path that follows the
    best-ranked reply (lowest "rank", else the first) at every turn, as the OASST SFT sets were built."""
    messages, node, where = [], record.get("prompt", record), "prompt"
    while node is not None:
        if not isinstance(node, dict):
            raise BadRecord(source, f"field '{where}' must be an object")
        role = {"prompter": "user", "assistant": "assistant"}.get(node.get("role"))
        if role is None:
            raise BadRecord(source, f"field '{where}.role' is {node.get('role')!r}; expected prompter or assistant")
        messages.append({"role": role, "content": _text(node, "text", f"{source}: {where}")})
        replies = [r for r in node.get("replies") or [] if isinstance(r, dict)]
        ranked = sorted(replies, key=lambda r: r.get("rank") if isinstance(r.get("rank"), int) else 1 << 30)
        node, where = (ranked[0], f"{where}.replies") if ranked else (None, where)
    return messages


def flan_messages(record: dict[str, Any], source: str) -> list[Message]:
    """FLAN / P3 templated examples: the template is already applied, "inputs" -> "targets"
    (P3 spells them inputs_pretokenized/targets_pretokenized)."""
    suffix = "" if "inputs" in record else "_pretokenized"
    return [{"role": "user", "content": _text(record, "inputs" + suffix, source)},
            {"role": "assistant", "content": _text(record, "targets" + suffix, source)}]


CONVERSATION_FORMATS: dict[str, Callable[[dict[str, Any], str], list[Message]]] = {
    "alpaca": alpaca_messages, "self-instruct": self_instruct_messages, "sharegpt": sharegpt_messages,
    "chat": chat_messages, "oasst": oasst_messages,
    "flan": flan_messages,
}


def detect_conversation_format(record: dict[str, Any], source: str) -> str:
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "self-instruct" if "instances" in record else "alpaca"
    if "inputs" in record or "inputs_pretokenized" in record:
        return "flan"
    if "text" in record and "role" in record or "prompt" in record and isinstance(record["prompt"], dict):
        return "oasst"
    raise BadRecord(source, f"unknown conversation format (keys {sorted(record)[:8]}); expected alpaca "
                            "(instruction/output), sharegpt (conversations), chat (messages), oasst (text/role/"
                            "replies) or flan (inputs/targets)")


def _parse_records(path: str | Path, format: str, formats: dict[str, Any], detect: Any, what: str
                   ) -> Iterator[tuple[str, Any]]:
    """(source, parsed) of every record in `path`, each parsed by its format's reader (`format`, or the
    one `detect` recognizes from the record's keys)."""
    if format != "auto" and format not in formats:
        raise LmforgeError(f"unknown {what} format {format!r}; choose auto or one of {', '.join(formats)}")
    for source, record in iter_records(path):
        kind = format if format != "auto" else detect(record, source)
        yield source, formats[kind](record, source)


def read_conversations(path: str | Path, format: str = "auto") -> list[Conversation]:
    """All conversations in `path` (file or directory); each ends with an assistant message."""
    out = []
    for source, messages in _parse_records(path, format, CONVERSATION_FORMATS, detect_conversation_format,
                                           "conversation"):
        check_conversation(messages, source)
        out.append(Conversation(messages, source))
    return out


def check_conversation(messages: list[Message], source: str) -> None:
    """At least one assistant turn, and the last turn is the assistant's (else nothing is learned from it)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(source, "conversation has no assistant message to learn from")
    if messages[-1]["role"] != "assistant":
        raise BadRecord(source, f"conversation ends with a {messages[-1]['role']} message; the last must be "
                                "the assistant's")


# ----------------------------------------------------------------------------------------------
# preference pairs

HH_TURN_MARKERS = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}


def parse_hh_transcript(text: str, source: str, key: str) -> list[Message]:
    """"\\n\\nHuman: ...\\n\\nAssistant: ..." -> messages (Bai et al. 2022, Anthropic HH-RLHF)."""
    import re

    parts = re.split(r"(\n\nHuman:|\n\nAssistant:)", text)
    if parts[0].strip():
        raise BadRecord(source, f"field '{key}' does not start with '\\n\\nHuman:'")
    messages = [{"role": HH_TURN_MARKERS[marker], "content": body.strip()}
                for marker, body in zip(parts[1::2], parts[2::2])]
    if not messages:
        raise BadRecord(source, f"field '{key}' has no Human:/Assistant: turns")
    return messages


def hh_pair(record: dict[str, Any], source: str) -> PreferencePair:
    """HH-RLHF stores two whole transcripts; they share every turn but the last assistant reply."""
    chosen = parse_hh_transcript(_text(record, "chosen", source), source, "chosen")
    rejected = parse_hh_transcript(_text(record, "rejected", source), source, "rejected")
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise BadRecord(source, f"field '{key}' does not end with an Assistant: turn")
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord(source, "fields 'chosen' and 'rejected' differ before their last Assistant: turn")
    return _pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], source)


def shp_pair(record: dict[str, Any], source: str) -> PreferencePair:
    """Stanford SHP: history, human_ref_A/B, labels = 1 when A is preferred."""
    a, b = _text(record, "human_ref_A", source), _text(record, "human_ref_B", source)
    label = record.get("labels")
    if label not in (0, 1):
        raise BadRecord(source, f"field 'labels' must be 0 or 1, got {label!r}")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return _pair([{"role": "user", "content": _text(record, "history", source)}], chosen, rejected, source)


def pku_pair(record: dict[str, Any], source: str) -> PreferencePair:
    """PKU-SafeRLHF: prompt, response_0/1, better_response_id (or safer_response_id)."""
    key = "better_response_id" if "better_response_id" in record else "safer_response_id"
    best = record.get(key)
    if best not in (0, 1):
        raise BadRecord(source, f"field '{key}' must be 0 or 1, got {best!r}")
    responses = [_text(record, "response_0", source), _text(record, "response_1", source)]
    return _pair([{"role": "user", "content": _text(record, "prompt", source)}], responses[best],
                 responses[1 - best], source)


def se_pair(record: dict[str, Any], source: str) -> PreferencePair:
    """Stack Exchange paired (as in TRL's StackLLaMA): question, response_j (better), response_k."""
    return _pair([{"role": "user", "content": _text(record, "question", source)}],
                 _text(record, "response_j", source), _text(record, "response_k", source), source)


def plain_pair(record: dict[str, Any], source: str) -> PreferencePair:
    """{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}."""
    prompt = record.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = chat_messages({"messages": prompt}, source)
    else:
        raise BadRecord(source, "field 'prompt' must be a non-empty string or list of messages")
    return _pair(messages, _response(record, "chosen", source), _response(record, "rejected", source), source)


def _response(record: dict[str, Any], key: str, source: str) -> str:
    value = record.get(key)
    if isinstance(value, list):  # TRL's conversational form: [{"role": "assistant", "content": ...}]
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise BadRecord(source, f"field '{key}' must be a string or one assistant message")
        return _text(value[0], "content", f"{source}: {key}[0]")
    return _text(record, key, source)


def _pair(prompt: list[Message], chosen: str, rejected: str, source: str) -> PreferencePair:
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise BadRecord(source, f"field '{key}' is an empty response")
    return PreferencePair(prompt, chosen, rejected, source)


# LLaMA 2's four-level preference scale (Touvron et al. 2023, sec. 3.2.1) and the "small" margin of its
# Table 28, m(r) in {1, 2/3, 1/3, 0}: the reward model must separate strongly preferred pairs further.
RATING_LEVELS = {"significantly better": 1.0, "better": 2 / 3, "slightly better": 1 / 3, "negligibly better": 0.0,
                 "unsure": 0.0}


def preference_rating(record: dict[str, Any], source: str) -> float | None:
    """The strength of a pair's preference in [0, 1] from its optional `rating` field: one of LLaMA 2's levels
    (significantly better, better, slightly better, negligibly better / unsure) or the level as a number 0-3."""
    value = record.get("rating")
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in RATING_LEVELS:
        return RATING_LEVELS[value.strip().lower()]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 3:
        return float(value) / 3
    raise BadRecord(source, f"field 'rating' must be one of {', '.join(RATING_LEVELS)} or a number in [0, 3], "
                            f"got {value!r}")


PREFERENCE_FORMATS: dict[str, Callable[[dict[str, Any], str], PreferencePair]] = {
    "hh-rlhf": hh_pair, "shp": shp_pair, "pku": pku_pair, "se": se_pair, "plain": plain_pair,
}


def detect_preference_format(record: dict[str, Any], source: str) -> str:
    if "human_ref_A" in record:
        return "shp"
    if "response_0" in record:
        return "pku"
    if "response_j" in record:
        return "se"
    if "prompt" in record:
        return "plain"
    if "chosen" in record or "rejected" in record:
        return "hh-rlhf"
    raise BadRecord(source, f"unknown preference format (keys {sorted(record)[:8]}); expected hh-rlhf "
                            "(chosen/rejected transcripts), shp, pku, se or plain (prompt/chosen/rejected); "
                            "missing field 'chosen'/'rejected'")


def read_preference_pairs(path: str | Path, format: str = "auto") -> list[PreferencePair]:
    """All preference pairs in `path` (file or directory), each with its `rating` when the record has one."""
    rated = {**PREFERENCE_FORMATS}
    for name, parse in PREFERENCE_FORMATS.items():
        rated[name] = lambda record, source, parse=parse: dataclasses.replace(
            parse(record, source), rating=preference_rating(record, source))
    return [pair for _, pair in _parse_records(path, format, rated, detect_preference_format, "preference")]
