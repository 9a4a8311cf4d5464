"""Constrained decoding for `response_format` (JSON object / JSON schema), with llguidance.

llguidance (Microsoft's grammar engine behind Guidance, also used by vLLM and SGLang) compiles a
JSON schema to a grammar over the tokenizer's vocabulary; before each sampling step it gives the
set of tokens that keep the output a valid prefix, and the scheduler masks every other token to
-inf. The end-of-turn tokens are allowed only once the JSON is complete, and decoding stops as
soon as nothing more can follow. JSON is written compactly with Python's separators (", ", ": ")
and no other whitespace, so a model cannot wander off into endless blank space.

llguidance is optional (the `serve` extra): without it, a request with a JSON response_format is
refused with a 400 naming the field.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

from lmforge.core.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(LmforgeError):
    """A response_format that cannot be compiled (bad schema, or llguidance missing)."""


class Grammars:
    """Compiles response formats for one tokenizer; the llguidance tokenizer is built once, on first use."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: list[int]) -> None:
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids

    @functools.cached_property
    def _lib(self) -> tuple[Any, Any]:
        try:
            import llguidance
        except ImportError:
            raise GrammarError("constrained decoding needs llguidance: pip install 'lmforge[serve]'") from None
        lltok = llguidance.LLTokenizer(self.tokenizer.tk.to_str(), n_vocab=self.vocab_size,
                                       eos_token=self.stop_ids or None)
        return llguidance, lltok

    def compile(self, schema: dict[str, Any]) -> str:
        """A checked grammar for JSON matching `schema` ({"type": "object"} for any JSON object)."""
        llguidance, lltok = self._lib
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not valid: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, lltok)
        if error and not error.startswith("WARNING"):
            raise GrammarError(f"the JSON schema cannot be used: {error}")
        return grammar

    def matcher(self, grammar: str) -> Constraint:
        llguidance, lltok = self._lib
        return Constraint(llguidance.LLMatcher(lltok, grammar), self.vocab_size)


class Constraint:
    """One request's position in its grammar: which tokens may come next, and whether it is complete."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """[vocab_size] bool: the tokens that keep the output valid."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        return ((words[:, None] >> self._bits) & 1).flatten()[:self.vocab_size].bool()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [1, V] with every token the grammar forbids set to -inf."""
        allowed = self.allowed().to(logits.device)
        out = torch.full_like(logits, float("-inf"), dtype=torch.float32)
        n = min(allowed.shape[0], logits.shape[-1])
        out[:, :n] = torch.where(allowed[:n], logits[:, :n].float(), out[:, :n])
        return out

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise LmforgeError(f"grammar: token {token} was not allowed ({self.matcher.get_error()})")

    @property
    def complete(self) -> bool:
        """Nothing more can follow: the output is a whole JSON value."""
        return self.matcher.is_stopped()


def response_schema(response_format: Any) -> dict[str, Any] | None:
    """OpenAI's response_format -> the JSON schema to enforce; None for plain text. Raises GrammarError
    naming what is wrong with the field."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError("must be an object like {\"type\": \"json_object\"}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError("'json_schema' must be an object with a 'schema' object")
        return spec.get("schema") or {"type": "object"}
    raise GrammarError(f"type {json.dumps(kind)} is not one of text, json_object, json_schema")
