"""Evaluation tasks: a small YAML spec + JSONL examples, rendered into prompts, and their metrics.

A task is `NAME.yaml` beside (or pointing at) `NAME.jsonl`:

    name: cloze
    type: multiple_choice          # or: generate
    data: cloze.jsonl              # relative to the YAML file
    prompt: "{context}"            # str.format over each example's fields
    choices: choices               # multiple_choice: field holding the list of choice strings
    answer: answer                 # index of the right choice (or its text); generate: the answer(s)
    fewshot: 0                     # solved examples put in front of each prompt

Scoring follows lm-evaluation-harness: a multiple-choice prediction is the choice with the highest
log-likelihood given the prompt (`acc`), or the highest log-likelihood per character of the choice
(`acc_norm`, which stops long choices losing just for having more tokens); a generative prediction
is the greedy continuation cut at the first stop string, scored by exact match and SQuAD token F1
(Rajpurkar et al., 2016).
"""

from __future__ import annotations

import collections
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.core.config import from_dict, option
from lmforge.core.errors import ConfigError, LmforgeError

TaskType = Literal["multiple_choice", "generate"]


@dataclass
class TaskSpec:
    """What a task YAML file may hold (unknown keys are an error naming the closest valid one)."""

    name: str = option(help="task name, used in results and reports")
    type: TaskType = option(help="multiple_choice (log-likelihood of each choice) or generate (greedy text)")
    data: str = option(help="JSONL file of examples, relative to the YAML file")
    prompt: str = option("{prompt}", "str.format template over an example's fields")
    choices: str = option("choices", "multiple_choice: field holding the list of choice strings")
    answer: str = option("answer", "field with the right choice's index or text (multiple_choice), "
                                   "or the answer string or list of accepted strings (generate)")
    target_delimiter: str = option(" ", "text between the prompt and a choice or answer")
    fewshot: int = option(0, "solved examples (from fewshot_data, else other examples) before each prompt")
    fewshot_data: str = option("", "JSONL of few-shot examples; empty draws them from `data`")
    fewshot_delimiter: str = option("\n\n", "text between few-shot examples")
    chat: bool = option(False, "wrap the prompt as a user turn of the tokenizer's chat template "
                               "(for instruction-tuned models; few-shot turns become earlier turns)")
    stop: list[str] = option(default_factory=lambda: ["\n\n"],
                             help="generate: cut the output at the first of these strings")
    max_new_tokens: int = option(32, "generate: most new tokens")
    answer_pattern: str = option("", "generate: regex whose first group (or whole match) is the prediction; "
                                     "empty takes the whole stripped output")
    seed: int = option(1234, "seed of the few-shot draw")


@dataclass
class Example:
    """One rendered example: `prompt` ends where the model's part begins."""

    index: int
    fields: dict[str, Any]
    prompt: str
    choices: list[str] = field(default_factory=list)
    gold: int = -1  # multiple_choice: index of the right choice
    answers: list[str] = field(default_factory=list)  # generate: accepted answers


@dataclass
class Task:
    spec: TaskSpec
    path: Path
    examples: list[Example]

    @property
    def name(self) -> str:
        return self.spec.name


def load_task(path: str | Path, limit: int = 0) -> Task:
    """Read a task YAML and its JSONL examples; every problem is one error naming file:line or field."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"task file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise LmforgeError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise LmforgeError(f"{path}: a task file must be a mapping of keys (name, type, data, prompt, ...)")
    try:
        spec = from_dict(TaskSpec, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if spec.fewshot < 0 or spec.max_new_tokens < 1:
        raise ConfigError(f"{path}: fewshot must be >= 0 and max_new_tokens >= 1")
    rows = read_examples(path.parent / spec.data)
    if limit > 0:
        rows = rows[:limit]
    shots_pool = read_examples(path.parent / spec.fewshot_data) if spec.fewshot_data else None
    examples = [make_example(spec, i, row, f"{path.parent / spec.data}:{i + 1}") for i, row in enumerate(rows)]
    if spec.fewshot:
        add_fewshot(spec, examples, shots_pool, path)
    return Task(spec, path, examples)


def read_examples(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise LmforgeError(f"task data not found: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise LmforgeError(f"{path}:{lineno}: each line must be a JSON object")
        rows.append(row)
    if not rows:
        raise LmforgeError(f"{path}: no examples")
    return rows


def render(template: str, fields: dict[str, Any], where: str) -> str:
    try:
        return template.format_map(fields)
    except KeyError as e:
        raise LmforgeError(f"{where}: prompt uses field {e} but the example has only {sorted(fields)}") from None
    except (ValueError, IndexError) as e:
        raise LmforgeError(f"{where}: bad prompt template ({e})") from None


def make_example(spec: TaskSpec, index: int, row: dict[str, Any], where: str) -> Example:
    ex = Example(index, row, render(spec.prompt, row, where))
    if spec.answer not in row:
        raise LmforgeError(f"{where}: no '{spec.answer}' field (the task's answer field)")
    answer = row[spec.answer]
    if spec.type == "multiple_choice":
        choices = row.get(spec.choices)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise LmforgeError(f"{where}: field '{spec.choices}' must be a list of at least two strings")
        ex.choices = choices
        if isinstance(answer, bool) or not isinstance(answer, (int, str)):
            raise LmforgeError(f"{where}: '{spec.answer}' must be a choice index or a choice's text")
        if isinstance(answer, str):
            if answer not in choices:
                raise LmforgeError(f"{where}: answer {answer!r} is not one of the choices")
            answer = choices.index(answer)
        if not 0 <= answer < len(choices):
            raise LmforgeError(f"{where}: answer index {answer} is outside the {len(choices)} choices")
        ex.gold = answer
    else:
        answers = answer if isinstance(answer, list) else [answer]
        if not answers or not all(isinstance(a, (str, int, float)) for a in answers):
            raise LmforgeError(f"{where}: '{spec.answer}' must be a string or a list of strings")
        ex.answers = [str(a) for a in answers]
    return ex


def target(spec: TaskSpec, ex: Example) -> str:
    """The right continuation of an example (its gold choice, or its first accepted answer)."""
    return ex.choices[ex.gold] if spec.type == "multiple_choice" else ex.answers[0]


def add_fewshot(spec: TaskSpec, examples: list[Example], pool_rows: list[dict[str, Any]] | None,
                path: Path) -> None:
    """Prefix each prompt with `spec.fewshot` solved examples drawn with a fixed seed (never itself)."""
    if pool_rows is not None:
        pool = [make_example(spec, i, r, f"{path.parent / spec.fewshot_data}:{i + 1}")
                for i, r in enumerate(pool_rows)]
    else:
        pool = list(examples)
    need = spec.fewshot + (0 if pool_rows is not None else 1)
    if len(pool) < need:
        raise LmforgeError(f"{path}: fewshot {spec.fewshot} needs {need} examples to draw from, found {len(pool)}")
    solved_pool = [(s.index, s.prompt, target(spec, s)) for s in pool]  # before any prompt gets its shots
    rng = random.Random(spec.seed)
    for ex in examples:
        drawn = rng.sample(solved_pool, need)
        shots = [(p, t) for i, p, t in drawn if pool_rows is not None or i != ex.index][:spec.fewshot]
        ex.fields = {**ex.fields, "_fewshot": shots}
        if not spec.chat:
            solved = [p + spec.target_delimiter + t for p, t in ex.fields["_fewshot"]]
            ex.prompt = spec.fewshot_delimiter.join([*solved, ex.prompt])


def chat_messages(ex: Example) -> list[dict[str, str]]:
    """The example as chat turns: few-shot pairs as earlier user/assistant turns, then the prompt."""
    messages = []
    for prompt, answer in ex.fields.get("_fewshot", []):
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return [*messages, {"role": "user", "content": ex.prompt}]


# ------------------------------------------------------------------------------------------------
# metrics


def multiple_choice_metrics(logliks: list[float], choices: list[str], gold: int) -> dict[str, float]:
    """acc: argmax of the summed log-likelihoods; acc_norm: argmax of log-likelihood per character
    of the choice text (lm-evaluation-harness's `completion_len`, the delimiter not counted)."""
    pred = max(range(len(logliks)), key=lambda i: logliks[i])
    norm = [ll / max(len(c), 1) for ll, c in zip(logliks, choices)]
    pred_norm = max(range(len(norm)), key=lambda i: norm[i])
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, answer: str) -> float:
    """Harmonic mean of token precision and recall after `normalize_answer` (SQuAD v1.1 script)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def extract_prediction(output: str, spec: TaskSpec) -> str:
    text = cut_at_stop(output, spec.stop).strip()
    if spec.answer_pattern:
        match = re.search(spec.answer_pattern, text)
        if match is None:
            return ""
        text = (match.group(1) if match.groups() else match.group(0)).strip()
    return text


def generate_metrics(prediction: str, answers: list[str]) -> dict[str, float]:
    """exact_match: the prediction equals an accepted answer up to whitespace runs; f1: best token F1."""
    pred = " ".join(prediction.split())
    return {"exact_match": float(any(pred == " ".join(a.split()) for a in answers)),
            "f1": max(token_f1(prediction, a) for a in answers)}
