"""Reasoning models on the server: the thinking section apart from the answer, and a thinking budget.

A reasoning model answers `<think> ... </think>` then the answer (`lmforge.tasks.reasoning`, DeepSeek-R1).
As DeepSeek's API and vLLM's reasoning parsers do, a chat completion returns the text inside the thinking
section as `message.reasoning_content` (streamed as `delta.reasoning_content`) and only the answer as
`content`. A response that does not open with `<think>` is all content.

`tasks.reasoning.ThinkSplitter` routes text as it streams (chat and generate use it too).

`ThinkBudget` caps the thinking (`max_reasoning_tokens`, or `reasoning_effort`): once the budget of tokens
after `<think>` is spent without a `</think>`, the scheduler feeds the tokens of `</think>` instead of
sampling, and the model goes on with its answer (budget forcing, Muennighoff et al. 2025, "s1").
"""

from __future__ import annotations

from lmforge.tasks.reasoning import THINK_CLOSE, THINK_OPEN, partial_tag
from lmforge.tokenizer import Tokenizer

EFFORTS = ("minimal", "low", "medium", "high")


def effort_budget(effort: str, max_tokens: int) -> int | None:
    """`reasoning_effort` as a thinking budget: minimal 0, low a quarter and medium half of max_tokens, high
    no cap."""
    return {"minimal": 0, "low": max_tokens // 4, "medium": max_tokens // 2, "high": None}[effort]


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
        close = THINK_CLOSE[partial_tag(self.text, THINK_CLOSE):]  # a started tag is completed, not repeated
        if close == THINK_CLOSE and not self.text.endswith("\n"):
            close = "\n" + close
        return self.tokenizer.encode(close + "\n")
