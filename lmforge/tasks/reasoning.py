"""A verifiable multi-step reasoning task: chains of additions and subtractions solved as numbered steps.

A problem is `calc: 3 + 4 - 2`; its solution thinks first, one checkable step a line, then answers:

    <think>
    1. 3+4=7
    2. 7-2=5
    </think>
    5

Every step has exactly one right text (the running value, the problem's next operator and operand, the
result), so a completion's steps get true labels: a step is good when it and every step before it are
right (a wrong step poisons the ones after it, as in PRM800K's first-error labelling). The line after
`</think>` is the answer step. Running values stay in 0..MAX_VALUE and operands are small, so a tiny model
learns the format quickly and the arithmetic (80 facts) only partly: the room search at test time is for.

Train and held-out problems never share a prompt: the task suite's stable hash (`suite.split_of`) splits the
prompt space in two and the seed's parity picks the half (even seed = train, odd seed = held out).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lmforge.core.config import option, require
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_text
from lmforge.data.formats import Message
from lmforge.tasks.suite import split_of

KIND = "calc"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_VALUE = 9  # running values stay in 0..9; operands are 1..MAX_OPERAND (the first 0..9)
MAX_OPERAND = 4


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    ops: tuple[str, ...]  # "+" or "-", one fewer than operands

    @property
    def prompt(self) -> str:
        text = str(self.operands[0])
        for op, b in zip(self.ops, self.operands[1:]):
            text += f" {op} {b}"
        return f"{KIND}: {text}"

    def values(self) -> list[int]:
        """The running value after each step (the last one is the answer)."""
        out, v = [], self.operands[0]
        for op, b in zip(self.ops, self.operands[1:]):
            v = v + b if op == "+" else v - b
            out.append(v)
        return out

    @property
    def answer(self) -> str:
        return str(self.values()[-1])

    def steps(self) -> list[str]:
        """The right text of each step, in order."""
        before = [self.operands[0], *self.values()[:-1]]
        return [f"{i + 1}. {a}{op}{b}={v}"
                for i, (a, op, b, v) in enumerate(zip(before, self.ops, self.operands[1:], self.values()))]

    def solution(self) -> str:
        return "\n".join([THINK_OPEN, *self.steps(), THINK_CLOSE, self.answer])

    def messages(self, with_solution: bool = True) -> list[Message]:
        user: list[Message] = [{"role": "user", "content": self.prompt}]
        return [*user, {"role": "assistant", "content": self.solution()}] if with_solution else user


def _problem(rng: random.Random, n_operands: int) -> Problem:
    operands, ops = [rng.randint(0, 9)], []
    v = operands[0]
    for _ in range(n_operands - 1):
        b = rng.randint(1, MAX_OPERAND)
        op = rng.choice("+-")
        if op == "+" and v + b > MAX_VALUE:
            op = "-"
        if op == "-" and v - b < 0:
            op = "+"
        v = v + b if op == "+" else v - b
        operands.append(b)
        ops.append(op)
    return Problem(tuple(operands), tuple(ops))


def make_problems(n: int, seed: int = 0, min_steps: int = 2, max_steps: int = 3) -> list[Problem]:
    """`n` problems of `min_steps`..`max_steps` steps; deterministic in the arguments. Even seeds draw from
    the train half of the prompt space, odd seeds from the held-out half."""
    if n < 0:
        raise LmforgeError(f"make_problems: n must be >= 0, got {n}")
    if not 1 <= min_steps <= max_steps:
        raise LmforgeError(f"make_problems: need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    rng, half, out = random.Random(seed), seed & 1, []
    while len(out) < n:
        p = _problem(rng, rng.randint(min_steps, max_steps) + 1)
        if split_of(KIND, p.prompt) == half:
            out.append(p)
    return out


def parse_problem(prompt: str) -> Problem:
    """The problem a `calc:` prompt states (the inverse of `Problem.prompt`)."""
    words = prompt.removeprefix(f"{KIND}:").split()
    try:
        if not prompt.startswith(f"{KIND}:") or len(words) < 3 or len(words) % 2 == 0 \
                or any(w not in "+-" for w in words[1::2]):
            raise ValueError
        return Problem(tuple(int(w) for w in words[0::2]), tuple(words[1::2]))
    except ValueError:
        raise LmforgeError(f"not a reasoning problem: {prompt!r} (expected e.g. '{KIND}: 3 + 4 - 2')") from None


# ----------------------------------------------------------------------------------------------
# reading completions


@dataclass(frozen=True)
class Step:
    text: str  # the line, stripped
    end: int  # character offset in the completion just after the line (and its newline, if any)
    is_answer: bool  # the first line after </think>


def split_steps(completion: str, finished: bool = True) -> list[Step]:
    """The steps of a (partial) completion: every non-empty line except the think markers, up to and
    including the answer line (the first after `</think>`). The last line counts only when it ends in a
    newline or the completion is `finished`."""
    steps, pos, closed = [], 0, False
    lines = completion.split("\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        end = pos + len(line) + (0 if last else 1)
        pos = end
        if last and not finished:
            break
        text = line.strip()
        if text == THINK_CLOSE:
            closed = True
        elif text and text != THINK_OPEN:
            steps.append(Step(text, end, closed))
            if closed:
                break
    return steps


def extract_answer(completion: str) -> str | None:
    """The answer line of a completion (after `</think>`), whitespace collapsed; None when there is none."""
    steps = split_steps(completion)
    return " ".join(steps[-1].text.split()) if steps and steps[-1].is_answer else None


# ----------------------------------------------------------------------------------------------
# the thinking section apart from the answer (serve's reasoning_content, chat, generate --json, RL metrics)


def partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag` (0 when none)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ThinkSplitter:
    """A response's text as it streams in, (reasoning, content) pieces out: text inside a leading
    `<think>...</think>` is reasoning, the rest content (all of it when the response does not open with
    `<think>`). Only what could still be part of a tag, and the whitespace around the tags, is held back, so the
    pieces join to what `split_reasoning` gives for the whole text; `finish()` releases what was held."""

    def __init__(self) -> None:
        self.state = "start"  # start: nothing but whitespace yet; think: inside <think>; answer: after it
        self.held = ""
        self.thought = False  # a thinking section was opened
        self.skip_space = False  # drop the whitespace right after a tag

    def feed(self, text: str) -> tuple[str, str]:
        self.held += text
        reasoning, content = "", ""
        if self.state == "start":
            head = self.held.lstrip()
            if not head or (THINK_OPEN.startswith(head) and head != THINK_OPEN):
                return "", ""
            if not head.startswith(THINK_OPEN):
                self.state, content, self.held = "answer", self.held, ""
                return "", content
            self.state, self.thought, self.skip_space = "think", True, True
            self.held = head[len(THINK_OPEN):]
        if self.state == "think":
            if self.skip_space:
                self.held = self.held.lstrip()
                self.skip_space = not self.held
            end = self.held.find(THINK_CLOSE)
            if end < 0:
                keep = len(self.held) - partial_tag(self.held, THINK_CLOSE)
                body = self.held[:keep]
                keep = len(body.rstrip())  # whitespace before a possible </think> waits too
                reasoning, self.held = self.held[:keep], self.held[keep:]
                return reasoning, ""
            reasoning = self.held[:end].rstrip()
            self.state, self.skip_space = "answer", True
            self.held = self.held[end + len(THINK_CLOSE):]
        if self.skip_space:
            self.held = self.held.lstrip()
            self.skip_space = not self.held
        content, self.held = self.held, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held: an unclosed thinking section's tail is reasoning, anything else content."""
        held, self.held = self.held, ""
        return (held.rstrip(), "") if self.state == "think" else ("", held)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning_content or None when the response did not think, content) of a whole response."""
    s = ThinkSplitter()
    r1, c1 = s.feed(text)
    r2, c2 = s.finish()
    return (r1 + r2 if s.thought else None), c1 + c2


def verify(problem: Problem, completion: str) -> float:
    """1.0 when the completion's answer is the problem's answer, else 0.0 (the outcome verifier)."""
    return 1.0 if extract_answer(completion) == problem.answer else 0.0


def check_step(problem: Problem, index: int, text: str) -> bool:
    """Whether `text` is the right step number `index` (0-based) of `problem`, spaces ignored; index
    len(steps) is the answer step."""
    right = problem.steps() + [problem.answer]
    return index < len(right) and "".join(text.split()) == right[index].replace(" ", "")


def step_labels(problem: Problem, completion: str, finished: bool = True) -> list[bool]:
    """The true label of each step of a completion: good while every step so far is right. The answer
    step is checked as the answer (a late answer after too few or too many steps is wrong)."""
    labels, good = [], True
    n = len(problem.steps())
    for i, step in enumerate(split_steps(completion, finished)):
        index = n if step.is_answer else i
        good = good and i == index and (step.is_answer or i < n) and check_step(problem, index, step.text)
        labels.append(good)
    return labels


# ----------------------------------------------------------------------------------------------
# `lmforge reasoning data`


@dataclass
class StepRange:
    """How many reasoning steps the problems of a command have."""

    min_steps: int = option(2, "fewest reasoning steps of a problem")
    max_steps: int = option(3, "most reasoning steps of a problem")

    def __post_init__(self) -> None:
        require(1 <= self.min_steps <= self.max_steps, "min_steps", self.min_steps, "in 1..max_steps")


@dataclass
class ReasoningDataConfig(StepRange):
    out: str = option("data/reasoning.jsonl", "JSONL file of chat conversations ({\"messages\": [...]}) that "
                                              "`lmforge sft --data` reads")
    problems: int = option(2000, "number of problems")
    seed: int = option(0, "even: the train half of the prompt space; odd: the held-out half")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.problems >= 1, "problems", self.problems, ">= 1")


def write_reasoning_data(cfg: ReasoningDataConfig) -> Path:
    """Write `cfg.problems` solved problems as chat conversations (atomically)."""
    problems = make_problems(cfg.problems, cfg.seed, cfg.min_steps, cfg.max_steps)
    path = Path(cfg.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({"messages": p.messages()}) + "\n" for p in problems))
    print(f"reasoning: {len(problems)} problems -> {path}")
    return path
