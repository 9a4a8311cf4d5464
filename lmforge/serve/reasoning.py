"""Reasoning models on the server: the thinking section apart from the answer, and a thinking budget.

A reasoning model answers `<think> ... </think>` then the answer (`lmforge.tasks.reasoning`, DeepSeek-R1).
As DeepSeek's API and vLLM's reasoning parsers do, a chat completion returns the text inside the thinking
section as `message.reasoning_content` (streamed as `delta.reasoning_content`) and only the answer as
`content`. A response that does not open with `<think>` is all content.

`ThinkSplitter` routes text as it streams: it holds back only what could still be part of a tag (and the
whitespace around the tags), so streamed pieces join to exactly what the whole response gives.

`ThinkBudget` caps the thinking (`max_reasoning_tokens`, or `reasoning_effort`): once the budget of tokens
after `<think>` is spent without a `</think>`, the scheduler feeds the tokens of `</think>` instead of
sampling, and the model goes on with its answer (budget forcing, Muennighoff et al. 2025, "s1").
"""

from __future__ import annotations

from lmforge.tasks.reasoning import THINK_CLOSE, THINK_OPEN
from lmforge.tokenizer import Tokenizer

EFFORTS = ("minimal", "low", "medium", "high")


def effort_budget(effort: str, max_tokens: int) -> int | None:
    """`reasoning_effort` as a thinking budget: minimal 0, low a quarter and medium half of max_tokens, high
    no cap."""
    return {"minimal": 0, "low": max_tokens // 4, "medium": max_tokens // 2, "high": None}[effort]


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag` (0 when none)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ThinkSplitter:
    """Text in, (reasoning, content) pieces out; `finish()` releases what was held back."""

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
                keep = len(self.held) - _partial_tag(self.held, THINK_CLOSE)
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


class ThinkBudget:
    """Counts the tokens generated inside the thinking section; when `budget` of them are spent before
    `</think>`, `push` returns the token ids that close it (once)."""

    def __init__(self, budget: int, tokenizer: Tokenizer) -> None:
        self.budget, self.tokenizer = budget, tokenizer
        self.text = ""  # the response so far, while it matters
        self.state = "start"  # start, think, done
        self.used = 0

    def push(self, text: str) -> list[int]:
        """The text one generated token added; returns the tokens to force next (usually none)."""
        if self.state == "done":
            return []
        self.text += text
        if self.state == "start":
            head = self.text.lstrip()
            if THINK_OPEN.startswith(head) and head != THINK_OPEN:
                return []
            if not head.startswith(THINK_OPEN):
                self.state = "done"  # the response does not think: nothing to cap
                return []
            self.state, self.text = "think", head[len(THINK_OPEN):]
        else:
            self.used += 1
            if THINK_CLOSE in self.text:
                self.state = "done"
                return []
        if self.used < self.budget:
            return []
        self.state = "done"
        close = THINK_CLOSE[_partial_tag(self.text, THINK_CLOSE):]  # a started tag is completed, not repeated
        if close == THINK_CLOSE and not self.text.endswith("\n"):
            close = "\n" + close
        return self.tokenizer.encode(close + "\n")
