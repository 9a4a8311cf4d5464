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
        """(content, tool_calls) of a finished answer; no calls when the text holds none (or was cut short)."""
        if self.choice == "none":
            return text, []
        if self.choice == "function":
            return (None, [_call(self.name, text)]) if _is_json(text) else (text, [])
        if self.choice == "required":
            try:
                return None, [_call(c["name"], json.dumps(c["arguments"])) for c in json.loads(text)]
            except (ValueError, TypeError, KeyError):  # cut short by max_tokens
                return text, []
        calls = []
        for block in CALL_BLOCK.findall(text):
            try:
                call = json.loads(block)
            except ValueError:
                continue
            args = call.get("arguments", call.get("parameters")) if isinstance(call, dict) else None
            if isinstance(call, dict) and call.get("name") in self.parameters and args is not None:
                calls.append(_call(call["name"], args if isinstance(args, str) else json.dumps(args)))
        if not calls:
            return text, []
        content = CALL_BLOCK.sub("", text).strip()
        return content or None, calls


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
