"""Reasoning: the multi-step task family, process reward models, and search at test time."""

from __future__ import annotations

import pytest

from lmforge.core.errors import LmforgeError
from lmforge.tasks.reasoning import (
    Problem,
    check_step,
    extract_answer,
    make_problems,
    parse_problem,
    split_steps,
    step_labels,
    verify,
)
from lmforge.tasks.suite import split_of

P = Problem((3, 4, 2), ("+", "-"))


def test_problem_renders_numbered_steps_in_a_think_section():
    assert P.prompt == "calc: 3 + 4 - 2" and P.answer == "5"
    assert P.solution() == "<think>\n1. 3+4=7\n2. 7-2=5\n</think>\n5"
    assert parse_problem(P.prompt) == P
    assert P.messages()[-1] == {"role": "assistant", "content": P.solution()}
    with pytest.raises(LmforgeError, match="not a reasoning problem"):
        parse_problem("calc: 3 + + 4")


def test_splits_are_disjoint_and_values_stay_in_range():
    train, held = make_problems(200, seed=0), make_problems(200, seed=1)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert all(split_of("calc", p.prompt) == 0 for p in train)
    assert all(0 <= v <= 19 for p in train + held for v in p.values())
    assert {len(p.steps()) for p in train} == {2, 3}
    assert make_problems(5, seed=2) == make_problems(5, seed=2)


def test_step_checker_and_verifier():
    assert verify(P, P.solution()) == 1.0 and extract_answer(P.solution()) == "5"
    assert verify(P, "<think>\n1. 3+4=7\n</think>\n6") == 0.0 and extract_answer("1. 3+4=7\n") is None
    assert check_step(P, 0, "1. 3 + 4 = 7") and not check_step(P, 0, "1. 3+4=8") and check_step(P, 2, "5")
    assert step_labels(P, P.solution()) == [True, True, True]
    # a wrong step poisons every later step, even an arithmetically consistent one
    assert step_labels(P, "<think>\n1. 3+4=8\n2. 8-2=6\n</think>\n6") == [False, False, False]
    assert step_labels(P, "<think>\n1. 3+4=7\n2. 7-2=4\n</think>\n5") == [True, False, False]
    # the right answer after too few steps, or an answer written as a step, is wrong
    assert step_labels(P, "<think>\n1. 3+4=7\n</think>\n5") == [True, False]
    assert step_labels(P, "<think>\n1. 3+4=7\n2. 7-2=5\n5\n") == [True, True, False]
    # a partial completion: the unfinished last line is not a step yet
    assert [s.text for s in split_steps("<think>\n1. 3+4=7\n2. 7-", finished=False)] == ["1. 3+4=7"]
    assert split_steps("<think>\n1. 3+4=7\n")[0].end == len("<think>\n1. 3+4=7\n")
