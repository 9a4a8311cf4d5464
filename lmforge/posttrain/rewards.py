"""Rewards of RL and rejection sampling: built-in verifiers, a reward model, or the user's own function.

A reward is a weighted sum of terms, each given as `NAME[:WEIGHT]` (weight 1 when left out):
- `exact`, `numeric`, `math`: the completion's answer against the example's reference answer
  (`lmforge.tasks.verifiers`); `task` is another name for `exact`.
- `regex`: the `regex` option's pattern, else the example's "regex" field, found in the completion.
- `json_schema`: the completion is JSON valid under the `json_schema` file, else the example's "schema" field.
- `model`: the score of `reward_model` (a directory from `lmforge reward`).
- `module:function`: `function(prompt, completion, example) -> float` from the user's module (imported by name,
  from the current directory or the installed packages), with `prompt` the last user message and `example`
  the record as read from the prompt file.

`--reward exact:1 regex:0.5` (or `exact:1,regex:0.5`, or a list in a recipe) adds 1 x exact + 0.5 x regex.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmforge.core.config import option, require
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.files import read_json_object
from lmforge.data.readers import BadRecord
from lmforge.posttrain.reward import load_reward_model, score_texts
from lmforge.tasks.prompts import PromptExample
from lmforge.tasks.verifiers import ANSWER_VERIFIERS, json_schema_reward, regex_reward, schema_validator
from lmforge.tokenizer import Tokenizer

BUILTIN = (*ANSWER_VERIFIERS, "regex", "json_schema", "model")
ALIASES = {"task": "exact"}
_USER_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class RewardTerm:
    name: str  # a BUILTIN name or "module:function"
    weight: float = 1.0

    @property
    def is_verifier(self) -> bool:
        """A 0/1 built-in check (not a reward model, not the user's function)."""
        return self.name in BUILTIN and self.name != "model"


def parse_reward(spec: str, key: str = "reward") -> RewardTerm:
    """"NAME[:WEIGHT]" -> RewardTerm; a trailing ":number" is the weight, so "mod:fn:0.5" works too."""
    head, sep, tail = spec.strip().rpartition(":")
    try:
        name, weight = (head, float(tail)) if sep else (spec.strip(), 1.0)
    except ValueError:
        name, weight = spec.strip(), 1.0
    name = ALIASES.get(name, name)
    if name not in BUILTIN and not _USER_FUNCTION.fullmatch(name):
        raise ConfigError(f"{key}: {spec!r} is not {', '.join(BUILTIN)} or module:function (with an optional "
                          ":WEIGHT)")
    if not math.isfinite(weight):
        raise ConfigError(f"{key}: weight of {spec!r} must be a finite number")
    return RewardTerm(name, weight)


@dataclass
class RewardSource:
    """How a sampled completion is scored: the reward terms and what they need."""

    reward: list[str] = option(default_factory=list, help="reward terms NAME[:WEIGHT], summed: exact, numeric, math, "
                                                          "regex, json_schema (built-in verifiers against each "
                                                          "example's reference), model (reward_model's score) or "
                                                          "module:function (your function (prompt, completion, "
                                                          "example) -> float); empty = model when reward_model is "
                                                          "set, else exact")
    reward_model: str = option("", "reward model directory (`lmforge reward`) for the model reward")
    regex: str = option("", "pattern of the regex reward; empty = each example's 'regex' field")
    json_schema: str = option("", "JSON Schema file of the json_schema reward; empty = each example's 'schema' field")

    def reward_terms(self) -> list[RewardTerm]:
        if not self.reward:
            return [RewardTerm("model" if self.reward_model else "exact")]
        return [parse_reward(spec) for item in self.reward for spec in item.split(",") if spec.strip()]


def check_rewards(cfg: RewardSource) -> None:
    """The config checks of `RewardSource` (a stage's `__post_init__` calls this)."""
    names = {t.name for t in cfg.reward_terms()}
    require("model" not in names or bool(cfg.reward_model), "reward_model", cfg.reward_model,
            "a directory from `lmforge reward` when reward includes model")
    if cfg.regex:
        try:
            re.compile(cfg.regex)
        except re.error as e:
            raise ConfigError(f"regex: {cfg.regex!r} is not a valid pattern ({e})") from None
    if "json_schema" in names:
        try:
            import jsonschema  # noqa: F401
        except ImportError:
            raise ConfigError("reward: json_schema needs the jsonschema package (pip install jsonschema)") from None


def import_reward_function(name: str) -> Callable[..., Any]:
    """`module:function`, imported by module path (the current directory first, as `python -m` would)."""
    module_name, function_name = name.split(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise LmforgeError(f"reward {name}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise LmforgeError(f"reward {name}: module {module_name!r} has no function {function_name!r}")
    return fn


Term = Callable[[Sequence[PromptExample], Sequence[str]], list[float]]


class Scorer:
    """The reward of (example, completion) pairs: the weighted sum of the configured terms."""

    def __init__(self, cfg: RewardSource, tokenizer: Tokenizer, device: torch.device | str = "cpu") -> None:
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        self.terms = cfg.reward_terms()
        self.schema = read_json_object(cfg.json_schema) if cfg.json_schema else None
        if self.schema is not None:
            try:
                schema_validator(self.schema)
            except ValueError as e:
                raise LmforgeError(f"json_schema: {cfg.json_schema} is {e}") from None
        self.fns = {t.name: self._term(t.name) for t in self.terms}

    @property
    def is_verifier(self) -> bool:
        return all(t.is_verifier for t in self.terms)

    def max_verifier_reward(self) -> float:
        return sum(t.weight for t in self.terms)

    def check(self, examples: Sequence[PromptExample]) -> None:
        """Each example has what each term reads (a reference answer, a pattern, a schema), else a one-line
        error naming its file:line."""
        for ex in examples:
            for t in self.terms:
                if t.name in ANSWER_VERIFIERS and not ex.answer.strip():
                    raise BadRecord(ex.source, f"reward {t.name} needs a reference answer (field 'answer', or a "
                                               "last assistant turn)")
                if t.name == "regex" and not self.cfg.regex:
                    self._field(ex, "regex", str)
                if t.name == "json_schema" and self.schema is None:
                    self._schema_of(ex)

    def __call__(self, examples: Sequence[PromptExample], texts: Sequence[str]) -> Tensor:
        if len(examples) != len(texts):
            raise ValueError(f"{len(examples)} examples but {len(texts)} completions")
        total = torch.zeros(len(texts))
        for t in self.terms:
            total += t.weight * torch.tensor(self.fns[t.name](examples, texts), dtype=torch.float32)
        return total

    # --- one function per term: (examples, completions) -> rewards

    def _term(self, name: str) -> Term:
        if name in ANSWER_VERIFIERS:
            verify = ANSWER_VERIFIERS[name]
            return lambda exs, texts: [verify(c, ex.answer) for ex, c in zip(exs, texts)]
        if name == "regex":
            return lambda exs, texts: [regex_reward(c, self.cfg.regex or self._field(ex, "regex", str))
                                       for ex, c in zip(exs, texts)]
        if name == "json_schema":
            return lambda exs, texts: [json_schema_reward(c, self.schema or self._schema_of(ex))
                                       for ex, c in zip(exs, texts)]
        if name == "model":
            rm = load_reward_model(self.cfg.reward_model, device=self.device)
            return lambda exs, texts: score_texts(rm, self.tokenizer, [ex.messages for ex in exs], list(texts))
        return self._user_term(name, import_reward_function(name))

    @staticmethod
    def _user_term(name: str, fn: Callable[..., Any]) -> Term:
        def term(exs: Sequence[PromptExample], texts: Sequence[str]) -> list[float]:
            out = []
            for ex, c in zip(exs, texts):
                value = fn(ex.prompt, c, ex.record)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise LmforgeError(f"reward {name} returned {value!r} for {ex.source}; expected a finite number")
                out.append(float(value))
            return out
        return term

    @staticmethod
    def _field(ex: PromptExample, key: str, kind: type) -> Any:
        value = ex.record.get(key)
        if not isinstance(value, kind) or not value:
            raise BadRecord(ex.source, f"reward {key} needs field '{key}' (or the {key} option)")
        return value

    def _schema_of(self, ex: PromptExample) -> dict[str, Any]:
        value = ex.record.get("schema")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise BadRecord(ex.source, "field 'schema' is not JSON") from None
        if not isinstance(value, dict):
            raise BadRecord(ex.source, "reward json_schema needs field 'schema' (a JSON Schema object) or the "
                                       "json_schema option")
        try:
            schema_validator(value)
        except ValueError as e:
            raise BadRecord(ex.source, f"field 'schema' is {e}") from None
        return value
