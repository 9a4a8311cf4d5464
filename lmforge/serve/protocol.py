"""The OpenAI wire format: request checks, response bodies, streamed chunks and error objects.

Requests are checked by hand rather than by a pydantic model so every problem becomes one
OpenAI-style error ({"error": {"message", "type", "param", "code"}}) naming the field, which
is what the official clients parse and show. Fields OpenAI defines but this server does not
implement are refused when they would change the output (n > 1, penalties, logprobs) and
ignored otherwise (user, metadata, ...). Extensions shared with vLLM: `top_k`, `ignore_eos`.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.core.errors import LmforgeError
from lmforge.generate.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import prompt_ids

Kind = Literal["chat", "completion"]
ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4  # OpenAI's limit
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class ApiError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ModelInfo:
    """What request checks need to know about the served model."""

    name: str
    tokenizer: Tokenizer
    context_length: int
    chat_stop_ids: list[int]  # end of an assistant turn, and eos


@dataclass
class GenRequest:
    kind: Kind
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def parse_request(kind: Kind, body: dict[str, Any], info: ModelInfo) -> GenRequest:
    """Check every field we use and turn the body into token ids plus sampling settings."""
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required and must be a string", param="model")
    if model != info.name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{info.name}'",
                       param="model", code="model_not_found")
    _refuse_unsupported(body)
    prompt = _chat_prompt(body, info) if kind == "chat" else _completion_prompt(body, info)
    if len(prompt) >= info.context_length:
        raise ApiError(400, f"this model's maximum context length is {info.context_length} tokens, but the prompt "
                            f"has {len(prompt)} tokens; shorten it", param="messages" if kind == "chat" else "prompt",
                       code="context_length_exceeded")
    max_tokens = _max_tokens(kind, body, info)
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise ApiError(400, f"'temperature' must be >= 0, got {temperature}", param="temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    top_k = _integer(body, "top_k", 0)
    if top_k < 0:
        raise ApiError(400, f"'top_k' must be >= 0, got {top_k}", param="top_k")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, "'seed' must be an integer", param="seed")
    stops = _stop_strings(body.get("stop"))
    ignore_eos = _flag(body, "ignore_eos")
    stop_ids = [] if ignore_eos else (info.chat_stop_ids if kind == "chat" else _eos(info))
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            max_new_tokens=min(max_tokens, info.context_length - len(prompt)),
                            stop_token_ids=stop_ids)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return GenRequest(kind, prompt, params, stops, _flag(body, "stream"), bool(options.get("include_usage")))


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    if body.get("logprobs") not in (None, False):
        raise ApiError(400, "'logprobs' is not supported by this server", param="logprobs")


def _chat_prompt(body: dict[str, Any], info: ModelInfo) -> list[int]:

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}]: 'role' must be one of {', '.join(ROLES)}",
                           param=f"messages.[{i}].role")
        clean.append({"role": m["role"], "content": _content(m.get("content"), i)})
    try:
        return prompt_ids(info.tokenizer, clean)
    except LmforgeError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None


def _content(content: Any, i: int) -> str:
    """A string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}]: 'content' must be a string or a list of text parts",
                   param=f"messages.[{i}].content")


def _completion_prompt(body: dict[str, Any], info: ModelInfo) -> list[int]:
    """A string, one-string list, or a list of token ids; an empty prompt starts from bos."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    tok = info.tokenizer
    if isinstance(prompt, str):
        return tok.sequence_start + tok.encode(prompt)  # a document start (lmforge.tokenizer.chat)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < tok.vocab_size]
        if bad:
            raise ApiError(400, f"prompt token {bad[0]} is outside the vocabulary [0, {tok.vocab_size})",
                           param="prompt")
        return list(prompt)
    raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt")


def _max_tokens(kind: Kind, body: dict[str, Any], info: ModelInfo) -> int:
    name = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    default = DEFAULT_COMPLETION_TOKENS if kind == "completion" else info.context_length
    value = _integer(body, name, default)
    if value <= 0:
        raise ApiError(400, f"'{name}' must be >= 1, got {value}", param=name)
    if value > info.context_length:
        raise ApiError(400, f"'{name}' is {value}, more than the model's context of {info.context_length} tokens",
                       param=name)
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(value)}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(value)}", param=name)
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise ApiError(400, f"'{name}' must be true or false", param=name)
    return bool(value)


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings", param="stop")
    return [s for s in stops if s]


def _eos(info: ModelInfo) -> list[int]:
    eos = info.tokenizer.eos_id
    return [] if eos is None else [eos]


# ------------------------------------------------------------------------------------------------
# responses


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(kind: Kind, rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
             completion_tokens: int) -> dict[str, Any]:
    """The whole (non-streamed) answer."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(kind: Kind, rid: str, model: str, text: str | None = None, finish_reason: str | None = None,
          role: bool = False, usage_counts: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed event: a piece of text, the opening role (chat), the finish reason, or the usage."""
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                           "created": int(time.time()), "model": model}
    if usage_counts is not None:
        out["choices"], out["usage"] = [], usage_counts
        return out
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    out["choices"] = [choice]
    return out


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line pair."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
