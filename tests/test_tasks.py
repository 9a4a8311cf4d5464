import pytest

from lmforge.core.errors import LmforgeError
from lmforge.tasks.suite import (
    TASK_KINDS,
    TaskExample,
    exact_match,
    extract_answer,
    make_examples,
    split_of,
    task_reward,
)


def test_examples_are_deterministic_and_cycle_kinds():
    a = make_examples(60, seed=0)
    assert a == make_examples(60, seed=0)
    assert [e.kind for e in a[:len(TASK_KINDS)]] == list(TASK_KINDS)
    assert a != make_examples(60, seed=2)
    assert {e.kind for e in make_examples(10, seed=3, kinds=["copy"])} == {"copy"}


def test_train_and_held_out_seeds_share_no_prompt():
    train = make_examples(3000, seed=0)
    held = make_examples(1000, seed=1)
    assert not {(e.kind, e.prompt) for e in train} & {(e.kind, e.prompt) for e in held}
    assert all(split_of(e.kind, e.prompt) == 1 for e in held)
    # every kind still has many distinct prompts on both sides
    for kind in TASK_KINDS:
        assert len({e.prompt for e in held if e.kind == kind}) > 30


def test_answers_are_correct():
    for e in make_examples(600, seed=5):
        body = e.prompt.split(": ", 1)[1]
        if e.kind == "add":
            a, b = body.split(" + ")
            assert int(e.answer) == int(a) + int(b)
        elif e.kind == "count_letter":
            letter, word = e.prompt[len("count "):].split(" in: ")
            assert int(e.answer) == word.count(letter)
        elif e.kind == "spell":
            assert e.answer.replace(" ", "") == body
        elif e.kind == "sort":
            assert e.answer.split() == sorted(body.split())
        elif e.kind == "copy":
            assert e.answer == body
        elif e.kind == "reverse":
            assert e.answer.split() == body.split()[::-1]
        assert len(e.prompt) <= 40 and len(e.answer) <= 12


def test_extract_answer_and_reward():
    ex = TaskExample("add", "add: 3 + 4", "7")
    assert extract_answer("  7\nmore text") == "7"
    assert extract_answer("The answer: 7.") == "7"
    assert extract_answer("c  a   t") == "c a t"
    assert extract_answer("") == ""
    assert task_reward(ex, "7") == 1.0
    assert task_reward(ex, "answer = 7") == 1.0
    assert task_reward(ex, "8") == 0.0
    assert task_reward(ex, "77") == 0.0
    assert exact_match([ex, ex], ["7", "6"]) == 0.5
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match([ex], [])


def test_bad_arguments():
    with pytest.raises(LmforgeError, match="unknown task kind"):
        make_examples(3, kinds=["nope"])
    with pytest.raises(LmforgeError):
        make_examples(-1)
