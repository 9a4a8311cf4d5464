"""The OpenAI wire format: request checks, response bodies, streamed chunks and error objects.

Requests are checked by hand rather than by a pydantic model so every problem becomes one
OpenAI-style error ({"error": {"message", "type", "param", "code"}}) naming the field, which
is what the official clients parse and show. Implemented: n, batched prompts, logprobs (chat's
`logprobs.content[].top_logprobs`, completions' `tokens/token_logprobs/top_logprobs/text_offset`),
echo with the prompt's logprobs (what lm-evaluation-harness sends to score multiple choice),
presence/frequency penalties, logit_bias, seed, and `response_format` json_object / json_schema by
constrained decoding (`grammar.py`). Fields OpenAI defines but this server does not
implement are refused with a 400 naming them when they would change the output (`UNSUPPORTED`:
tools, suffix, best_of != n, ...) and ignored otherwise (user,
metadata, ...). Extensions shared with vLLM: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import tokenizers

from lmforge.core.errors import LmforgeError
from lmforge.generate.sampling import SamplingParams
from lmforge.serve.grammar import GrammarError, Grammars, response_schema
from lmforge.serve.reasoning import EFFORTS, effort_budget
from lmforge.serve.scheduler import Delta, Done, Event, Failed, Job, PromptLogprobs, TokenLogprob
from lmforge.serve.tools import CallStream, ToolError, Tools, parse_tools, template_message
from lmforge.tasks.reasoning import ThinkSplitter, split_reasoning
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import prompt_ids

Kind = Literal["chat", "completion"]
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_N = 128  # OpenAI's limit on choices per request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (completions allow 5; vLLM allows 20 for both)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 (ban) .. 100 (force)
SEED_RANGE = (-2**63, 2**63)  # int64, what torch.Generator.manual_seed takes
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions

# Fields that change the output but are not implemented: a 400 naming the field, never ignored. The value
# each may have without asking for anything (None, or a default that changes nothing) is allowed.
UNSUPPORTED = {
    "suffix": ("", None), "functions": ([], None),
    "function_call": ("none", None), "audio": (None,), "prediction": (None,), "web_search_options": (None,),
    "use_beam_search": (False, None), "min_tokens": (0, None), "prompt_logprobs": (None,),
    "allowed_token_ids": (None,), "bad_words": ([], None), "include_stop_str_in_output": (False, None),
    "truncate_prompt_tokens": (None,), "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,), "length_penalty": (1, 1.0, None),
}
NOT_IN_CHAT = {"echo": (None, False), "best_of": (None, 1)}  # completions-only fields chat must not use


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
    grammars: Grammars | None = None  # compiles response_format schemas (constrained decoding)
    adapters: tuple[str, ...] = ()  # LoRA adapters served beside the base model, each by its own name

    def served(self) -> str:
        return ", ".join(f"'{m}'" for m in (self.name, *self.adapters))


@dataclass
class GenRequest:
    """A checked request: one or more prompts, each answered `n` times (choice index = prompt * n + sample)."""

    kind: Kind
    prompts: list[list[int]]
    params: SamplingParams  # max_new_tokens is the requested max_tokens; `jobs` fits it to each prompt's room
    stop: list[str]
    stream: bool
    include_usage: bool
    n: int = 1
    logprobs: int | None = None  # alternatives reported per token; None: no logprobs
    echo: bool = False  # completions: the answer starts with the prompt (and its logprobs, if asked)
    logit_bias: dict[int, float] = field(default_factory=dict)
    context_length: int = 0
    grammar: str | None = None  # response_format compiled for llguidance
    grammars: Grammars | None = None
    tools: Tools | None = None
    adapter: str | None = None  # the LoRA adapter the request's `model` names (None: the base model)
    think_budget: int | None = None  # max_reasoning_tokens / reasoning_effort (None: thinking is not capped)

    def jobs(self, emit: Callable[[int, Event], None]) -> list[Job]:
        """One scheduler job per choice, in choice order; choice i's events go to emit(i, event). With a seed,
        sample j of a prompt is seeded with seed + j, so the n samples differ and each is reproducible."""
        out = []
        for p, prompt in enumerate(self.prompts):
            room = self.context_length - len(prompt)
            for j in range(self.n):
                seed = self.params.seed
                if seed is not None:
                    seed = (seed + j - SEED_RANGE[0]) % 2**64 + SEED_RANGE[0]
                params = dataclasses.replace(self.params, seed=seed,
                                             max_new_tokens=min(self.params.max_new_tokens, room))
                i = p * self.n + j
                constraint = None if self.grammar is None else self.grammars.matcher(self.grammar)
                out.append(Job(prompt, params, functools.partial(emit, i), self.stop, logprobs=self.logprobs,
                               echo_logprobs=self.echo and self.logprobs is not None, logit_bias=self.logit_bias,
                               constraint=constraint, adapter=self.adapter, think_budget=self.think_budget))
        return out


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
    if model != info.name and model not in info.adapters:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves {info.served()}",
                       param="model", code="model_not_found")
    _refuse_unsupported(kind, body)
    tools = _tools(body, info) if kind == "chat" else None
    prompts = [_chat_prompt(body, info, tools)] if kind == "chat" else _completion_prompts(body, info)
    for i, prompt in enumerate(prompts):
        if len(prompt) >= info.context_length:
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            raise ApiError(400, f"this model's maximum context length is {info.context_length} tokens, but "
                                f"{which} has {len(prompt)} tokens; shorten it",
                           param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    echo = kind == "completion" and _flag(body, "echo")
    n = _integer(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"'n' must be in [1, {MAX_N}], got {n}", param="n")
    best_of = _integer(body, "best_of", n)
    if best_of != n:
        raise ApiError(400, f"'best_of' other than n is not supported by this server (got {best_of}, n={n})",
                       param="best_of")
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise ApiError(400, f"'temperature' must be >= 0, got {temperature}", param="temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    top_k = _integer(body, "top_k", 0)
    if top_k < 0:
        raise ApiError(400, f"'top_k' must be >= 0, got {top_k}", param="top_k")
    min_p = _number(body, "min_p", 0.0)
    if not 0 <= min_p <= 1:
        raise ApiError(400, f"'min_p' must be in [0, 1], got {min_p}", param="min_p")
    penalties = {name: _number(body, name, 0.0) for name in ("presence_penalty", "frequency_penalty")}
    for name, value in penalties.items():
        if not -2 <= value <= 2:
            raise ApiError(400, f"'{name}' must be in [-2, 2], got {value}", param=name)
    repetition = _number(body, "repetition_penalty", 1.0)
    if repetition <= 0:
        raise ApiError(400, f"'repetition_penalty' must be > 0, got {repetition}", param="repetition_penalty")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not SEED_RANGE[0] <= seed < SEED_RANGE[1]):
        raise ApiError(400, f"'seed' must be an integer in [-2**63, 2**63), got {json.dumps(seed)}", param="seed")
    stops = _stop_strings(body.get("stop"))
    ignore_eos = _flag(body, "ignore_eos")
    # completions stop where the exported generation_config stops (eos and the end-of-turn token), as vLLM and HF
    # generate do on a `convert to-hf` export
    stop_ids = [] if ignore_eos else info.chat_stop_ids
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                            repetition_penalty=repetition, **penalties,
                            max_new_tokens=_max_tokens(kind, body, info, allow_zero=echo), stop_token_ids=stop_ids)
    think_budget = _think_budget(body, params.max_new_tokens) if kind == "chat" else None
    grammar = _grammar(body, info, tools)
    if grammar is not None and think_budget is not None:
        raise ApiError(400, "a thinking budget (max_reasoning_tokens, reasoning_effort) cannot be combined with "
                            "constrained output (response_format, tool_choice)", param="max_reasoning_tokens")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return GenRequest(kind, prompts, params, stops, _flag(body, "stream"), bool(options.get("include_usage")), n=n,
                      logprobs=_logprobs(kind, body), echo=echo, logit_bias=_logit_bias(body, info),
                      context_length=info.context_length, grammar=grammar,
                      grammars=info.grammars, tools=tools, adapter=None if model == info.name else model,
                      think_budget=think_budget)


def _think_budget(body: dict[str, Any], max_tokens: int) -> int | None:
    """`max_reasoning_tokens` (an integer >= 0), else `reasoning_effort` (`serve.reasoning.effort_budget`)."""
    if body.get("max_reasoning_tokens") is not None:
        budget = _integer(body, "max_reasoning_tokens", 0)
        if budget < 0:
            raise ApiError(400, f"'max_reasoning_tokens' must be >= 0, got {budget}", param="max_reasoning_tokens")
        return budget
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if effort not in EFFORTS:
        raise ApiError(400, f"'reasoning_effort' must be one of {', '.join(EFFORTS)}, got {json.dumps(effort)}",
                       param="reasoning_effort")
    return effort_budget(effort, max_tokens)


def _tools(body: dict[str, Any], info: ModelInfo) -> Tools | None:
    try:
        return parse_tools(body, info.tokenizer.chat_template or "")
    except ToolError as e:
        raise ApiError(400, str(e), param=e.param) from None


def _grammar(body: dict[str, Any], info: ModelInfo, tools: Tools | None = None) -> str | None:
    """`response_format` json_object / json_schema, or tool_choice required / a named function -> an llguidance
    grammar (None when the output is free)."""
    try:
        schema = response_schema(body.get("response_format"))
        call_schema = None if tools is None else tools.schema()
        if schema is not None and call_schema is not None:
            raise GrammarError("cannot be combined with tool_choice 'required' or a named function")
        schema = schema or call_schema
        if schema is None:
            return None
        if info.grammars is None:
            raise GrammarError("constrained decoding is not set up on this server")
        return info.grammars.compile(schema)
    except GrammarError as e:
        raise ApiError(400, f"response_format: {e}", param="response_format") from None


def _refuse_unsupported(kind: Kind, body: dict[str, Any]) -> None:
    for name, harmless in UNSUPPORTED.items():
        if name in body and body[name] not in harmless:
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    if kind == "chat":
        for name, harmless in NOT_IN_CHAT.items():
            if name in body and not any(body[name] is h or body[name] == h for h in harmless):
                raise ApiError(400, f"'{name}' is a /v1/completions field; chat completions do not take it",
                               param=name)
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        raise ApiError(400, "'modalities' other than [\"text\"] are not supported", param="modalities")


def _logprobs(kind: Kind, body: dict[str, Any]) -> int | None:
    """How many alternatives to report per token; None when logprobs are not asked for.
    Chat: `logprobs: true` plus `top_logprobs: k`; completions: `logprobs: k`."""
    if kind == "chat":
        wanted = _flag(body, "logprobs")
        top = _integer(body, "top_logprobs", 0)
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs")
        if top > 0 and not wanted:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return top if wanted else None
    if body.get("logprobs") is None:
        return None
    top = _integer(body, "logprobs", 0)
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}", param="logprobs")
    return top


def _logit_bias(body: dict[str, Any], info: ModelInfo) -> dict[int, float]:
    """{"token id": bias} -> {id: bias}; ids must be in the vocabulary, biases in [-100, 100]."""
    raw = body.get("logit_bias")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ApiError(400, "'logit_bias' must be an object mapping token ids to numbers", param="logit_bias")
    out = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < info.tokenizer.vocab_size:
            raise ApiError(400, f"logit_bias: {json.dumps(key)} is not a token id in [0, {info.tokenizer.vocab_size})",
                           param="logit_bias")
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or abs(value) > MAX_LOGIT_BIAS):
            raise ApiError(400, f"logit_bias[{json.dumps(key)}] must be a number in [-100, 100], got "
                                f"{json.dumps(value)}", param="logit_bias")
        out[token] = float(value)
    return out


def _chat_prompt(body: dict[str, Any], info: ModelInfo, tools: Tools | None) -> list[int]:
    """The chat template over the messages (and tools); `developer` is OpenAI's new name for `system` (rendered
    as system); `tool` messages and assistant `tool_calls` go to the template, which refuses what it cannot show."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}]: 'role' must be one of {', '.join(ROLES)}",
                           param=f"messages.[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        calls = m.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)):
            raise ApiError(400, f"messages[{i}]: 'tool_calls' must be a list of {{id, type, function}} objects on an "
                                "assistant message", param=f"messages.[{i}].tool_calls")
        content = "" if calls and m.get("content") is None else _content(m.get("content"), i)
        message = {"role": role, "content": content}
        for key in ("tool_call_id", "name"):
            if role == "tool" and isinstance(m.get(key), str):
                message[key] = m[key]
        clean.append(template_message({**message, "tool_calls": calls}) if calls else message)
    try:
        return prompt_ids(info.tokenizer, clean, tools=None if tools is None else tools.specs)
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


def _completion_prompts(body: dict[str, Any], info: ModelInfo) -> list[list[int]]:
    """`prompt`: a string, a list of token ids, or a batch of either (a list of strings or of id lists).
    Text follows the sequence start (as `lmforge generate`'s does; `Tokenizer.sequence_start`); token ids are used as
    they are."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        return [_one_prompt(prompt, info, "prompt")]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        return [_one_prompt(p, info, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise ApiError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either",
                   param="prompt")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def _one_prompt(prompt: str | list[int], info: ModelInfo, where: str) -> list[int]:
    tok = info.tokenizer
    if isinstance(prompt, str):
        ids = tok.sequence_start + tok.encode(prompt)  # a document start (lmforge.tokenizer.chat)
        if not ids:
            raise ApiError(400, f"{where} is empty and this tokenizer has no bos or eos token to start from",
                           param="prompt")
        return ids
    bad = [t for t in prompt if not 0 <= t < tok.vocab_size]
    if bad:
        raise ApiError(400, f"{where}: token {bad[0]} is outside the vocabulary [0, {tok.vocab_size})",
                       param="prompt")
    return list(prompt)


def _max_tokens(kind: Kind, body: dict[str, Any], info: ModelInfo, allow_zero: bool = False) -> int:
    """max_tokens (or chat's max_completion_tokens); 0 only with echo (score the prompt, generate nothing)."""
    name = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    default = DEFAULT_COMPLETION_TOKENS if kind == "completion" else info.context_length
    value = _integer(body, name, default)
    if value < (0 if allow_zero else 1):
        raise ApiError(400, f"'{name}' must be >= {0 if allow_zero else 1}, got {value}", param=name)
    if value > info.context_length:
        raise ApiError(400, f"'{name}' is {value}, more than the model's context of {info.context_length} tokens",
                       param=name)
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {json.dumps(value)}", param=name)
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


def tokenize(body: dict[str, Any], info: ModelInfo) -> dict[str, Any]:
    """vLLM's POST /tokenize: {"prompt": text, "add_special_tokens": true} (the sequence start, as a completion
    prompt gets it) or
    {"messages": [...]} (the chat prompt) -> {"tokens", "count", "max_model_len"}."""
    if "messages" in body:
        ids = _chat_prompt(body, info, _tools(body, info))
    else:
        if not isinstance(body.get("prompt"), str):
            raise ApiError(400, "'prompt' must be a string (or send 'messages')", param="prompt")
        start = _flag(body, "add_special_tokens") if "add_special_tokens" in body else True
        ids = (info.tokenizer.sequence_start if start else []) + info.tokenizer.encode(body["prompt"])
    return {"tokens": ids, "count": len(ids), "max_model_len": info.context_length}


def detokenize(body: dict[str, Any], info: ModelInfo) -> dict[str, Any]:
    """vLLM's POST /detokenize: {"tokens": [...]} -> {"prompt": text} (special tokens kept)."""
    tokens = body.get("tokens")
    if not _is_ids(tokens) and tokens != []:
        raise ApiError(400, "'tokens' must be a list of token ids", param="tokens")
    return {"prompt": info.tokenizer.decode(_one_prompt(tokens, info, "tokens") if tokens else [],
                                            skip_special_tokens=False)}


def tokenizer_info(info: ModelInfo) -> dict[str, Any]:
    """vLLM's GET /tokenizer_info: what lm-evaluation-harness's remote tokenizer reads."""
    special = info.tokenizer.special_tokens
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special.get("bos"),
            "eos_token": special.get("eos"), "pad_token": special.get("pad"),
            "chat_template": info.tokenizer.chat_template, "model_max_length": info.context_length}


# ------------------------------------------------------------------------------------------------
# responses


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@functools.lru_cache(maxsize=1 << 16)
def token_text(tokenizer: Tokenizer, token: int) -> tuple[str, bytes]:
    """A token as logprobs show it: (text, its UTF-8 bytes). A byte-level BPE token can hold part of a
    character; its text is then OpenAI's "bytes:\\xe2\\x80" form, and `bytes` are the true bytes (so the
    bytes of consecutive tokens join into the output's UTF-8)."""
    raw = None
    if isinstance(tokenizer.tk.decoder, tokenizers.decoders.ByteLevel):
        piece = tokenizer.tk.id_to_token(token)
        if piece is not None and token not in tokenizer.tk.get_added_tokens_decoder():
            raw = bytes(_BYTE_OF_CHAR[c] for c in piece if c in _BYTE_OF_CHAR)
    if raw is None:
        raw = tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, char -> byte: printable bytes stand for themselves, the other 68 are
    shifted to U+0100 onwards in byte order (Radford et al. 2019, the `bytes_to_unicode` table)."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


_BYTE_OF_CHAR = _byte_level_alphabet()


class Choice:
    """One choice's text, logprobs and end, kept in OpenAI's shape as events arrive."""

    def __init__(self, kind: Kind, index: int, tokenizer: Tokenizer, logprobs: bool,
                 tools: Tools | None = None) -> None:
        self.kind, self.index, self.tokenizer, self.with_logprobs = kind, index, tokenizer, logprobs
        self.tools = tools if tools is not None and tools.choice != "none" else None
        self.calls = CallStream(self.tools) if self.tools is not None else None  # tells content from tool calls
        self.tool_calls: list[dict[str, Any]] = []
        self.content: str | None = None  # the message content once finished (tool calls taken out)
        self.text: list[str] = []
        self.offset = 0  # completions' text_offset: characters before the next token
        self.logprobs = self._empty_logprobs() if logprobs else None
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.splitter = ThinkSplitter() if kind == "chat" else None  # <think> text -> reasoning_content
        self.reasoning: str | None = None  # the message's reasoning_content once finished

    def _empty_logprobs(self) -> dict[str, list[Any]]:
        if self.kind == "chat":
            return {"content": [], "refusal": None}
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, text: str, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        """Append text and its tokens' logprobs; returns what it adds as stream chunks' choices (with tools: the
        content and tool-call deltas `CallStream` can tell apart so far, the logprobs with the first)."""
        self.text.append(text)
        piece: dict[str, Any] = {"index": self.index, "finish_reason": None, "logprobs": None}
        if self.with_logprobs:
            piece["logprobs"] = self._empty_logprobs()
            for e in entries:
                for part in (piece["logprobs"], self.logprobs):
                    self._add_entry(part, e)
                self.offset += len(self.tokenizer.decode([e.token]))
        if self.splitter is not None:
            return self._deltas(piece, *self.splitter.feed(text))
        piece["text"] = text
        return [piece]

    def _deltas(self, piece: dict[str, Any], reasoning: str, content: str) -> list[dict[str, Any]]:
        """Chat stream choices of new reasoning and content text (the content through `CallStream` with tools);
        the logprobs ride on the first. Nothing when the splitter holds everything back and there are no
        logprobs."""
        deltas: list[dict[str, Any]] = [{"reasoning_content": reasoning}] if reasoning else []
        if self.calls is not None:
            deltas += self.calls.push(content) if content else []
        elif content:
            deltas.append({"content": content})
        if not deltas and piece["logprobs"] is not None:
            deltas = [{}] if self.calls is not None else [{"content": ""}]
        return [{**piece, "delta": d, "logprobs": piece["logprobs"] if k == 0 else None} for k, d in enumerate(deltas)]

    def _add_entry(self, out: dict[str, Any], e: TokenLogprob) -> None:
        token = self._token(e.token)
        if self.kind == "chat":
            out["content"].append({**self._chat_token(token, e.logprob),
                                   "top_logprobs": [self._chat_token(self._token(t), lp) for t, lp in e.top]})
            return
        out["tokens"].append(token[0])
        out["token_logprobs"].append(e.logprob)
        top = None
        if e.logprob is not None:  # the sampled token is always listed, as vLLM does
            top = {self._token(t)[0]: lp for t, lp in e.top}
            top.setdefault(token[0], e.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(self.offset)

    def _token(self, token: int) -> tuple[str, bytes]:
        return token_text(self.tokenizer, token)

    @staticmethod
    def _chat_token(token: tuple[str, bytes], logprob: float | None) -> dict[str, Any]:
        return {"token": token[0], "logprob": logprob, "bytes": list(token[1])}

    def finish(self, reason: str, completion_tokens: int) -> list[dict[str, Any]]:
        """The end: returns the last deltas (what the thinking splitter and, with tools, `CallStream` held back)."""
        self.finish_reason, self.completion_tokens = reason, completion_tokens
        self.content = "".join(self.text)
        if self.splitter is None:
            return []
        piece: dict[str, Any] = {"index": self.index, "finish_reason": None, "logprobs": None}
        deltas = self._deltas(piece, *self.splitter.finish())
        self.reasoning, self.content = split_reasoning(self.content)
        if self.calls is None:
            return deltas
        deltas += [{**piece, "delta": d} for d in self.calls.finish()]
        self.content, self.tool_calls = self.calls.content, self.calls.calls
        if self.tool_calls and reason != "length":
            self.finish_reason = "tool_calls"
        return deltas

    def message(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "finish_reason": self.finish_reason, "logprobs": self.logprobs}
        if self.kind == "chat":
            out["message"] = self.message()
        else:
            out["text"] = "".join(self.text)
        return out


class Answer:
    """Gathers the events of every choice of one request (`add(i, event)`) into OpenAI's response body, or
    into stream chunks as they come. Prompt tokens count once per prompt, however many samples it gets."""

    def __init__(self, req: GenRequest, rid: str, model: str, tokenizer: Tokenizer) -> None:
        self.req, self.rid, self.model, self.tokenizer = req, rid, model, tokenizer
        self.choices = [Choice(req.kind, i, tokenizer, req.logprobs is not None, req.tools)
                        for i in range(len(req.prompts) * req.n)]
        self.echoed = [False] * len(self.choices)
        self.error: str | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or all(c.finish_reason is not None for c in self.choices)

    def add(self, i: int, event: Event) -> list[dict[str, Any]]:
        """Record choice i's event; returns the stream chunks it makes (an error is kept in `error`)."""
        choice, chunks = self.choices[i], []
        if self.req.echo and not self.echoed[i]:  # the prompt's text (and logprobs) come first
            self.echoed[i] = True
            scored = event.entries if isinstance(event, PromptLogprobs) else []
            prompt = self.req.prompts[i // self.req.n]
            chunks += [self._chunk([p]) for p in choice.add(self.tokenizer.decode(prompt), scored)]
        if isinstance(event, Delta):
            chunks += [self._chunk([p]) for p in choice.add(event.text, event.logprobs)]
        elif isinstance(event, Done):
            chunks += [self._chunk([p]) for p in choice.finish(event.finish_reason, event.completion_tokens)]
            chunks.append(self._chunk([self._end(choice)]))
        elif isinstance(event, Failed):
            self.error = event.message
            return []
        return chunks

    def _end(self, choice: Choice) -> dict[str, Any]:
        piece = {"index": choice.index, "finish_reason": choice.finish_reason, "logprobs": None}
        if self.req.kind == "chat":
            piece["delta"] = {}
        else:
            piece["text"] = ""
        return piece

    def opening(self) -> list[dict[str, Any]]:
        """Chat streams open each choice with the assistant role."""
        if self.req.kind != "chat":
            return []
        return [self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for c in self.choices]

    def usage(self) -> dict[str, int]:
        return usage(sum(len(p) for p in self.req.prompts), sum(c.completion_tokens for c in self.choices))

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._chunk([]), "usage": self.usage()}

    def body(self) -> dict[str, Any]:
        """The whole (non-streamed) answer."""
        return {"id": self.rid, "object": "chat.completion" if self.req.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": [c.body() for c in self.choices],
                "usage": self.usage()}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.req.kind == "chat" else "text_completion"
        return {"id": self.rid, "object": kind, "created": int(time.time()), "model": self.model, "choices": choices}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line pair."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
