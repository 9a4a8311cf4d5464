"""LLM-as-judge: a model behind an OpenAI-compatible endpoint says which of two answers is better.

Judges prefer whichever answer they read first more often than chance (Zheng et al. 2023, "Judging
LLM-as-a-judge", sec. 3.3), so every pair is judged twice, once in each order, at temperature 0. A verdict
counts 1 for the preferred answer, 0.5 each for a tie; A's score is the mean over both orders, so an answer
that wins only in the first position scores 0.5 (a tie). A reply that names neither answer is counted as
`invalid` and scored as a tie, never dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lmforge.generate.remote import RemoteClient, choice_text, sampling_body

JUDGE_SYSTEM = ("You are an impartial judge. You compare two answers to the same question and decide which one is "
                "more helpful, correct and relevant. Ignore the order in which they are shown and their length.")

JUDGE_TEMPLATE = ("Question:\n{question}\n\n[Answer A]\n{first}\n[End of answer A]\n\n[Answer B]\n{second}\n"
                  "[End of answer B]\n\nWhich answer is better? Reply with exactly one word: A, B, or tie.")

_VERDICT = re.compile(r"\b(A|B|[Tt][Ii][Ee])\b")  # capitals only: the article "a" is no verdict


def parse_verdict(reply: str) -> str | None:
    """"A", "B" or "tie" from the judge's reply (its first such word, "Answer A" included), else None."""
    found = _VERDICT.search(reply)
    return None if found is None else (found.group(1) if found.group(1) in "AB" else "tie")


def _score(verdict: str | None, first_is_a: bool) -> float:
    if verdict in (None, "tie"):
        return 0.5
    return 1.0 if (verdict == "A") == first_is_a else 0.0


def judge_pairs(client: RemoteClient, questions: Sequence[str], answers_a: Sequence[str],
                answers_b: Sequence[str], max_tokens: int = 16) -> dict[str, Any]:
    """A's score per question (1 win, 0.5 tie, 0 loss, averaged over both orders), with the judge's raw verdicts,
    the count of unusable replies, and how often the two orders agreed."""
    bodies = []
    for q, a, b in zip(questions, answers_a, answers_b, strict=True):
        for first, second in ((a, b), (b, a)):
            messages = [{"role": "system", "content": JUDGE_SYSTEM},
                        {"role": "user", "content": JUDGE_TEMPLATE.format(question=q, first=first, second=second)}]
            bodies.append({"messages": messages, **sampling_body(0.0, 1.0, max_tokens, 0)})
    replies = [choice_text(r, "chat") for r in client.map("/chat/completions", bodies)]
    verdicts = [parse_verdict(r) for r in replies]
    scores, consistent = [], 0
    for i in range(len(questions)):
        ab, ba = verdicts[2 * i], verdicts[2 * i + 1]
        s_ab, s_ba = _score(ab, True), _score(ba, False)
        scores.append((s_ab + s_ba) / 2)
        consistent += s_ab == s_ba
    return {"scores": scores, "verdicts": list(zip(verdicts[::2], verdicts[1::2])),
            "invalid": sum(v is None for v in verdicts), "position_consistency": consistent / max(1, len(questions)),
            "replies": replies}
