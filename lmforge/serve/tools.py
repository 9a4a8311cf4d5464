"""Tool (function) calling: check OpenAI's `tools` / `tool_choice`, and turn the model's text into `tool_calls`.

The tools go to the chat template (as transformers passes them), so a template that renders tools
(Qwen2.5, Hermes, Llama 3.1, ...) shows them to the model; a template that never mentions `tools`
would drop them silently, so such a request is refused. What the model writes back:

- `tool_choice: "auto"` (the default with tools): the text is searched for Hermes/Qwen2.5-style calls,
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; what is outside them is the content.
- `"required"` and a named function: the output is constrained (`grammar.py`) to a JSON list of
  {"name", "arguments"} objects whose arguments match each function's parameters schema, or to the named
  function's arguments, as vLLM does, so the calls always parse.
- `"none"`: tools are shown but the text is returned as it is.

`CallStream` reads the answer incrementally, as a stream sends it (OpenAI's chunks): text outside calls
goes out as content at once, except what might be the start of `<tool_call>` (and whitespace, which is
dropped next to a call); a call goes out as soon as its name is read (id, type, name), then its
`arguments` text piece by piece as the model writes it (the raw JSON text of the value, as written). The
non-streamed answer is the same parser over the whole text, so streamed deltas always add up to it. A
block whose name is unknown, or whose JSON does not start as `{"name": ..., "arguments": ...}`, is held
to its end and parsed whole (a call if it parses, else it stays text). A call cut short by max_tokens
keeps the arguments written so far (finish_reason "length").
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from lmforge.core.errors import LmforgeError

CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class ToolError(LmforgeError):
    """`tools` or `tool_choice` is malformed; the message names the part."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Tools:
    specs: list[dict[str, Any]]  # OpenAI's [{"type": "function", "function": {...}}], as the template gets them
    choice: str  # "none", "auto", "required", or "function" (the one in `name`)
    name: str | None = None

    @property
    def parameters(self) -> dict[str, dict[str, Any]]:
        return {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.specs}

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema the output is held to (None: the model writes freely)."""
        if self.choice == "function":
            return self.parameters[self.name]
        if self.choice != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for name, params in self.parameters.items()]
        return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}

    def calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool_calls) of a finished answer, read as `CallStream` reads it."""
        stream = CallStream(self)
        stream.push(text)
        stream.finish()
        return stream.content, stream.calls


OPEN, CLOSE = "<tool_call>", "</tool_call>"
_MORE, _FAIL = "more", "fail"


def _scan_header(buf: str) -> tuple[str, int, str | None]:
    """Read `{"name": "NAME", "arguments": ` (or "parameters") at the start of `buf`, whitespace allowed between
    parts: ("done", where the value starts, NAME), (_MORE, 0, None) if `buf` may still become one, or _FAIL."""
    i, n, name = 0, len(buf), None
    steps = ["{", '"name"', ":", "STRING", ",", ('"arguments"', '"parameters"'), ":"]
    for step in steps:
        while i < n and buf[i].isspace():
            i += 1
        if i == n:
            return _MORE, 0, None
        if step == "STRING":
            if buf[i] != '"':
                return _FAIL, 0, None
            end = i + 1
            while end < n and buf[end] not in '"\\':
                end += 1
            if end == n:
                return _MORE, 0, None
            if buf[end] == "\\":
                return _FAIL, 0, None  # an escaped name: parsed whole at the block's end
            name, i = buf[i + 1:end], end + 1
            continue
        options = step if isinstance(step, tuple) else (step,)
        if any(buf.startswith(o, i) for o in options):
            i += len(next(o for o in options if buf.startswith(o, i)))
        elif any(o.startswith(buf[i:]) for o in options):
            return _MORE, 0, None
        else:
            return _FAIL, 0, None
    while i < n and buf[i].isspace():
        i += 1
    return (_MORE, 0, None) if i == n else ("done", i, name)


class _Value:
    """Finds where a JSON value written character by character ends: depth of brackets, strings and escapes."""

    def __init__(self) -> None:
        self.depth, self.string, self.escape, self.scalar, self.done = 0, False, False, False, False

    def feed(self, text: str) -> int:
        """How many characters of `text` belong to the value (all of them while it is unfinished)."""
        for i, ch in enumerate(text):
            if self.string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.string = False
                    if self.depth == 0:
                        self.done = True
                        return i + 1
            elif self.scalar and (ch in ",}]" or ch.isspace()):
                self.done = True
                return i
            elif ch == '"':
                self.string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    self.done = True
                    return i + 1
            elif self.depth == 0:
                self.scalar = True
        return len(text)


class CallStream:
    """Incremental tool-call parser: `push(text)` and `finish()` return the deltas to send (`{"content": ...}` or
    `{"tool_calls": [...]}`, OpenAI's streaming shape); `content` and `calls` hold the whole message so far."""

    def __init__(self, tools: Tools) -> None:
        self.tools, self.known = tools, tools.parameters
        self.content: str | None = None
        self.calls: list[dict[str, Any]] = []
        self.buf = ""  # text not decided yet
        self.pending = ""  # whitespace held: dropped if a call follows, sent if text does
        self.after_call = False  # whitespace right after a call is dropped
        self.state = {"auto": "text", "required": "list", "function": "start"}.get(tools.choice, "text")
        self.value: _Value | None = None
        self.deltas: list[dict[str, Any]] = []

    def push(self, text: str) -> list[dict[str, Any]]:
        self.buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[dict[str, Any]]:
        self._run(final=True)
        if self.state in ("text", "header", "raw"):  # an unfinished block stays text
            self._send_text((OPEN if self.state != "text" else "") + self.buf, final=True)
        self.buf = ""
        return self._take()

    def _take(self) -> list[dict[str, Any]]:
        out, self.deltas = self.deltas, []
        return out

    def _run(self, final: bool) -> None:
        while True:
            before = (self.state, len(self.buf))
            getattr(self, "_on_" + self.state)(final)
            if (self.state, len(self.buf)) == before:
                return

    # -- states: each consumes what it can of `buf` ------------------------------------------------------

    def _on_start(self, final: bool) -> None:  # tool_choice names a function: the whole answer is its arguments
        if self.buf:
            self._open(self.tools.name)
            self.state = "rest"

    def _on_rest(self, final: bool) -> None:
        self._arguments(self.buf)
        self.buf = ""

    def _on_text(self, final: bool) -> None:
        """Content up to a `<tool_call>`, holding back a tail that may be the start of one."""
        at = self.buf.find(OPEN)
        if at >= 0:
            self._send_text(self.buf[:at])
            self.buf, self.state = self.buf[at + len(OPEN):], "header"
            return
        keep = next((k for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1) if OPEN.startswith(self.buf[-k:])), 0)
        ready = self.buf[:len(self.buf) - keep]
        if ready:
            self._send_text(ready)
            self.buf = self.buf[len(ready):]

    def _send_text(self, text: str, final: bool = False) -> None:
        """Send `text` as content; its trailing whitespace waits (a call right after it drops it)."""
        if self.after_call:
            text = text.lstrip()
            if not text and not final:
                return
            self.after_call = False
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body):]
        if final:
            body, self.pending = body + self.pending, ""
        if body:
            self.content = (self.content or "") + body
            self.deltas.append({"content": body})

    def _on_header(self, final: bool) -> None:
        status, at, name = _scan_header(self.buf)
        if status == _MORE and CLOSE not in self.buf:
            return
        if status != "done" or name not in self.known:
            self.state = "raw"
            return
        self._open(name)
        self.buf, self.value, self.state = self.buf[at:], _Value(), "args"

    def _on_args(self, final: bool) -> None:
        if not self.buf:
            return
        used = self.value.feed(self.buf)
        self._arguments(self.buf[:used])
        self.buf = self.buf[used:]
        if self.value.done:
            self.state = "close" if self.tools.choice == "auto" else "item_end"

    def _on_close(self, final: bool) -> None:  # after the arguments: skip to the block's end
        at = self.buf.find(CLOSE)
        if at >= 0:
            self.buf, self.state, self.after_call = self.buf[at + len(CLOSE):], "text", True

    def _on_raw(self, final: bool) -> None:  # a block read whole: a call if it parses, else text
        at = self.buf.find(CLOSE)
        if at < 0:
            return
        block, self.buf, self.state = self.buf[:at], self.buf[at + len(CLOSE):], "text"
        try:
            call = json.loads(block)
        except ValueError:
            call = None
        args = call.get("arguments", call.get("parameters")) if isinstance(call, dict) else None
        if isinstance(call, dict) and call.get("name") in self.known and args is not None:
            self._open(call["name"])
            self._arguments(args if isinstance(args, str) else json.dumps(args))
            self.after_call = True
        else:
            self._send_text(OPEN + block + CLOSE)

    def _on_list(self, final: bool) -> None:  # tool_choice "required": [{"name": ..., "arguments": ...}, ...]
        body = self.buf.lstrip()
        if body.startswith("["):
            self.buf, self.state = body[1:], "item"

    def _on_item(self, final: bool) -> None:
        status, at, name = _scan_header(self.buf)
        if status == "done" and name in self.known:
            self._open(name)
            self.buf, self.value, self.state = self.buf[at:], _Value(), "args"
        elif status != _MORE or final:
            self.state = "stop"  # the grammar keeps this from happening; what follows is not a call

    def _on_item_end(self, final: bool) -> None:
        body = self.buf.lstrip()
        if body.startswith("}"):
            rest = body[1:].lstrip()
            if rest.startswith(","):
                self.buf, self.state = rest[1:], "item"
            elif rest.startswith("]"):
                self.buf, self.state = "", "stop"

    def _on_stop(self, final: bool) -> None:
        self.buf = ""

    # -- output ------------------------------------------------------------------------------------------

    def _open(self, name: str) -> None:
        self.pending = ""
        call = _call(name, "")
        self.calls.append(call)
        self.deltas.append({"tool_calls": [{"index": len(self.calls) - 1, **call,
                                            "function": {"name": name, "arguments": ""}}]})

    def _arguments(self, piece: str) -> None:
        if not piece:
            return
        self.calls[-1]["function"]["arguments"] += piece
        self.deltas.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": piece}}]})


def parse_tools(body: dict[str, Any], template: str) -> Tools | None:
    """Check `tools` and `tool_choice`; None without tools (then tool_choice may only be "none")."""
    specs, choice = body.get("tools"), body.get("tool_choice")
    if not specs:
        if choice not in (None, "none"):
            raise ToolError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(specs, list):
        raise ToolError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects", "tools")
    names = []
    for i, t in enumerate(specs):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                            f"tools.[{i}]")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object",
                            f"tools.[{i}].function.parameters")
        names.append(fn["name"])
    if len(set(names)) != len(names):
        raise ToolError("tool names must be unique", "tools")
    if "tools" not in template:
        raise ToolError("this model's chat template does not render tools", "tools")
    if choice is None or choice in ("auto", "none", "required"):
        return Tools(specs, choice or "auto")
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or name not in names:
        raise ToolError("'tool_choice' must be none, auto, required, or {\"type\": \"function\", \"function\": "
                        f"{{\"name\": one of {names}}}}}", "tool_choice")
    return Tools(specs, "function", name)


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's `tool_calls` as chat templates read them: arguments as an object, as transformers
    documents (OpenAI sends them as a JSON string)."""
    calls = []
    for call in message["tool_calls"]:
        fn = dict(call.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except ValueError:
                pass
        calls.append({**call, "function": fn})
    return {**message, "tool_calls": calls}


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
