"""User data for RL: prompt files, built-in verifiers, weighted and user-function rewards, and a GRPO run on a
user prompt file that must raise the held-out reward."""

from __future__ import annotations

import json
import sys

import pytest
from tinymodels import mha_model, save_checkpoint, text_tokenizer

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.posttrain.grpo import GrpoConfig, run_grpo
from lmforge.posttrain.ppo import PpoConfig, run_ppo
from lmforge.posttrain.rejection import RejectionConfig
from lmforge.posttrain.rewards import RewardTerm, Scorer, parse_reward
from lmforge.tasks import verifiers
from lmforge.tasks.prompts import PromptExample, read_prompts
from lmforge.tasks.verifiers import (
    exact_reward,
    json_schema_reward,
    math_equal,
    math_reward,
    numeric_reward,
    regex_reward,
)

# ---- verifiers ------------------------------------------------------------------------------------------------


def test_exact_and_numeric():
    assert exact_reward("answer: 12", "12") == 1.0 and exact_reward("12.", "12") == 1.0
    assert exact_reward("13", "12") == 0.0
    assert exact_reward("so \\boxed{7} it is", "7") == 1.0
    assert exact_reward("42", "Natalia sold 48 ... #### 42") == 1.0  # GSM8K reference
    for got, want in [("1,000", "1000"), ("3/4", "0.75"), ("50%", "0.5"), ("$2.50", "2.5"), ("The total is 18", "18"),
                      ("answer: -3.0", "-3")]:
        assert numeric_reward(got, want) == 1.0, (got, want)
    assert numeric_reward("17", "18") == 0.0 and numeric_reward("no number", "1") == 0.0
    assert numeric_reward("5", "not a number") == 0.0


@pytest.mark.parametrize("use_sympy", [True, False])
def test_math_equivalence(use_sympy):
    if use_sympy:
        pytest.importorskip("sympy")
    same = [("2x + 2", "2(x+1)"), ("\\frac{1}{2}", "0.5"), ("x^2", "x*x"), ("\\sqrt{4}", "2"), ("6/4", "3/2"),
            ("\\boxed{\\frac{3}{4}}", "0.75"), ("sin(x)^2 + cos(x)^2", "1")]
    for a, b in same:
        assert math_equal(verifiers.answer_of(a), b, use_sympy=use_sympy), (a, b)
    for a, b in [("2x + 1", "2(x+1)"), ("x^3", "x*x"), ("0.3", "1/3"), ("", "1")]:
        assert not math_equal(a, b, use_sympy=use_sympy), (a, b)


def test_math_never_executes_or_hangs():
    for hostile in ["__import__('os').system('true')", "(1).__class__", "[x for x in ()]", "2**2**2**2**2**2",
                    "9**9**9", "lambda: 1", "x" * 500]:
        assert math_reward(hostile, "1") == 0.0


def test_regex_and_json_schema():
    assert regex_reward("The answer is 42.", r"\d+") == 1.0 and regex_reward("none", r"\d") == 0.0
    pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert json_schema_reward('{"n": 3}', schema) == 1.0
    assert json_schema_reward('here:\n```json\n{"n": 3}\n```', schema) == 1.0
    assert json_schema_reward('{"n": "3"}', schema) == 0.0 and json_schema_reward("{n: 3", schema) == 0.0
    # a remote $ref is never fetched: unresolvable, so not valid
    assert json_schema_reward("1", {"$ref": "http://127.0.0.1:9/schema.json"}) == 0.0
    assert json_schema_reward("1", {"type": 12}) == 0.0  # not a schema


# ---- reward specs and the scorer ------------------------------------------------------------------------------


def test_parse_reward_specs():
    assert parse_reward("exact") == RewardTerm("exact", 1.0)
    assert parse_reward("regex:0.5") == RewardTerm("regex", 0.5)
    assert parse_reward("task") == RewardTerm("exact", 1.0)
    assert parse_reward("my.rewards:score") == RewardTerm("my.rewards:score", 1.0)
    assert parse_reward("my.rewards:score:-2") == RewardTerm("my.rewards:score", -2.0)
    for bad in ["exakt", "regex:nan", "1module:fn", "a:b:c:d"]:
        with pytest.raises(ConfigError, match="reward"):
            parse_reward(bad)


def test_config_errors():
    with pytest.raises(ConfigError, match="reward_model"):
        from_dict(GrpoConfig, {"reward": "exact,model"})
    with pytest.raises(ConfigError, match="reward: 'exakt'"):
        from_dict(PpoConfig, {"reward": ["exakt"]})
    with pytest.raises(ConfigError, match="regex"):
        from_dict(RejectionConfig, {"regex": "("})
    with pytest.raises(ConfigError, match="heldout"):
        from_dict(GrpoConfig, {"heldout": 1.0})
    # the weighted list, on the command line as a comma list
    cfg = from_dict(GrpoConfig, {"reward": "exact:1,regex:0.5", "regex": "x"})
    assert cfg.reward_terms() == [RewardTerm("exact", 1.0), RewardTerm("regex", 0.5)]
    assert from_dict(GrpoConfig, {"reward": ["exact:1,regex:0.5"], "regex": "x"}).reward_terms() == cfg.reward_terms()
    assert from_dict(GrpoConfig, {}).reward_terms() == [RewardTerm("exact")]
    assert from_dict(GrpoConfig, {"reward_model": "rm"}).reward_terms() == [RewardTerm("model")]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length_bonus(prompt, completion, example):\n"
        "    return len(completion) / 10 + (1 if example.get('bonus') else 0) + (prompt == 'q') * 100\n"
        "def broken(prompt, completion, example):\n"
        "    return 'high'\n")
    monkeypatch.chdir(tmp_path)
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def test_weighted_sum_with_a_user_function(user_module):
    cfg = from_dict(GrpoConfig, {"reward": [f"{user_module}:length_bonus:2", "exact", "regex:0.5"], "regex": "b"})
    scorer = Scorer(cfg, text_tokenizer())
    exs = [PromptExample([{"role": "user", "content": "p"}], "ab", {"bonus": True}, "f:1"),
           PromptExample([{"role": "user", "content": "q"}], "zz", {}, "f:2")]
    # 2 * (0.2 + 1) + 1 + 0.5 ; 2 * (0.2 + 100) + 0 + 0.5
    assert scorer(exs, ["ab", "ab"]).tolist() == pytest.approx([3.9, 200.9])


def test_user_function_errors_are_one_line(user_module):
    ex = [PromptExample([{"role": "user", "content": "p"}], "a", {}, "data.jsonl:7")]
    scorer = Scorer(from_dict(GrpoConfig, {"reward": f"{user_module}:broken"}), text_tokenizer())
    with pytest.raises(LmforgeError, match=r"returned 'high' for data.jsonl:7; expected a finite number"):
        scorer(ex, ["x"])
    for spec, problem in [("no_such_module:f", "cannot import module 'no_such_module'"),
                          (f"{user_module}:missing", "has no function 'missing'")]:
        with pytest.raises(LmforgeError, match=problem):
            Scorer(from_dict(GrpoConfig, {"reward": spec}), text_tokenizer())


def test_scorer_check_names_the_record():
    scorer = Scorer(from_dict(GrpoConfig, {"reward": "numeric,regex"}), text_tokenizer())
    with pytest.raises(LmforgeError, match=r"p.jsonl:3: reward numeric needs a reference answer"):
        scorer.check([PromptExample([{"role": "user", "content": "x"}], "", {}, "p.jsonl:3")])
    with pytest.raises(LmforgeError, match=r"p.jsonl:4: reward regex needs field 'regex'"):
        scorer.check([PromptExample([{"role": "user", "content": "x"}], "1", {}, "p.jsonl:4")])
    scorer.check([PromptExample([{"role": "user", "content": "x"}], "1", {"regex": "1"}, "p.jsonl:5")])


# ---- prompt files ---------------------------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_read_prompts_in_the_known_formats(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "add: 1 + 2", "answer": 3},
        {"instruction": "Sum", "input": "2 and 2", "output": "4"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "answer": "A"},
        {"prompt": [{"role": "user", "content": "json please"}], "schema": {"type": "object"}},
    ])
    exs = read_prompts(path)
    assert [e.prompt for e in exs] == ["add: 1 + 2", "Sum\n\n2 and 2", "hi", "q", "json please"]
    assert [e.answer for e in exs] == ["3", "4", "", "A", ""]
    assert exs[2].messages[0] == {"role": "system", "content": "be brief"}
    assert exs[4].record["schema"] == {"type": "object"} and exs[1].source == f"{path}:2"


@pytest.mark.parametrize("record,problem", [
    ('{"prompt": "x"', "malformed JSON"),
    ({"prompt": ""}, "field 'prompt' must be a non-empty string"),
    ({"prompt": "x", "answer": [1]}, "field 'answer' must be a string or a number"),
    ({"messages": [{"role": "assistant", "content": "only"}]}, "must end with a user message"),
    ({"question": "x"}, "unknown conversation format"),
])
def test_bad_prompt_records_name_file_and_line(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, record])
    with pytest.raises(LmforgeError, match=f"p.jsonl:2: .*{problem}"):
        read_prompts(path)


def test_cli_bad_prompt_file_is_one_line(tmp_path, capsys):
    tok = text_tokenizer()
    ckpt = save_checkpoint(mha_model(tok.vocab_size), tok, tmp_path / "base")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    code = main(["grpo", "--checkpoint", str(ckpt), "--prompts", str(path), "--reward", "numeric",
                 "--run_dir", str(tmp_path / "run"), "--train.device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in err
    assert f"{path}:2: reward numeric needs a reference answer" in err and len(err.splitlines()) == 1


# ---- GRPO and PPO on a user prompt file ---------------------------------------------------------------------------


@pytest.mark.parametrize("algo,extra", [("grpo", {"group_size": 4}),
                                        pytest.param("grpo", {"group_size": 4, "advantage": "rloo"},
                                                     marks=pytest.mark.slow),
                                        pytest.param("ppo", {"samples_per_prompt": 4}, marks=pytest.mark.slow)])
def test_rl_on_a_user_prompt_file_raises_the_heldout_reward(tmp_path, algo, extra):
    """Seeded: a random policy's greedy replies to held-out prompts never pass the regex verifier (a vowel), though
    some of its samples do; 16 GRPO (group or RLOO advantages) or PPO steps on the train prompts make most of them
    pass (GRPO so with seeds 0-3 too)."""
    tok = text_tokenizer()
    ckpt = save_checkpoint(mha_model(tok.vocab_size), tok, tmp_path / "base")
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"add: {a} + {b}", "answer": str(a + b)}
                                                    for a in range(8) for b in range(6)])
    cfg = from_dict(GrpoConfig if algo == "grpo" else PpoConfig, {
        "checkpoint": str(ckpt), "run_dir": str(tmp_path / "run"), "prompts": [str(path)], "reward": "regex",
        "regex": "[aeiou]", "heldout": 0.25, "rollout": {"prompts_per_rollout": 4}, **extra,
        "sampling": {"max_new_tokens": 4}, "train": {"steps": 16, "lr": 3e-2, "device": "cpu", "eval_every": 0}})
    out = (run_grpo if algo == "grpo" else run_ppo)(cfg)
    assert out["heldout_reward"] >= out["heldout_reward_before"] + 0.5
    assert "heldout_exact_match" in out  # every prompt has an answer: exact match is measured too


def test_json_schema_reward_from_a_schema_file_or_the_record(tmp_path):
    pytest.importorskip("jsonschema")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["n"]}))
    ex = [PromptExample([{"role": "user", "content": "p"}], "", {"schema": '{"type": "array"}'}, "f:1")] * 2
    from_file = Scorer(from_dict(GrpoConfig, {"reward": "json_schema", "json_schema": str(schema)}), text_tokenizer())
    assert from_file(ex, ['{"n": 1}', "[1]"]).tolist() == [1.0, 0.0]
    per_record = Scorer(from_dict(GrpoConfig, {"reward": "json_schema"}), text_tokenizer())
    assert per_record(ex, ['{"n": 1}', "[1]"]).tolist() == [0.0, 1.0]
    schema.write_text("[1]")
    with pytest.raises(LmforgeError, match="schema.json: expected a JSON object"):
        Scorer(from_dict(GrpoConfig, {"reward": "json_schema", "json_schema": str(schema)}), text_tokenizer())
    schema.write_text('{"type": 12}')
    with pytest.raises(LmforgeError, match="schema.json is not a valid JSON Schema"):
        Scorer(from_dict(GrpoConfig, {"reward": "json_schema", "json_schema": str(schema)}), text_tokenizer())
    with pytest.raises(LmforgeError, match="f:2: field 'schema' is not a valid JSON Schema"):
        per_record.check([PromptExample([{"role": "user", "content": "p"}], "", {"schema": {"type": 12}}, "f:2")])


# ---- eval winrate on a prompt file ----------------------------------------------------------------------------


def test_win_rate_on_a_prompt_file_with_a_numeric_verifier(tmp_path, monkeypatch):
    import lmforge.eval.pairwise as pairwise

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": "4"}, {"prompt": "half of 3?",
                                                                                   "answer": "1.5"},
                                              {"instruction": "ten?", "output": "10"}])
    replies = {"A": ["4", "3/2", "answer: 10.0"], "B": ["4", "2", "ten"]}
    monkeypatch.setattr(pairwise, "answers", lambda model, tokenizer, prompts, max_new_tokens: replies[model])
    out = pairwise.win_rate("A", "B", None, examples=read_prompts(path), verifier="numeric")
    assert (out["n"], out["wins"], out["ties"], out["losses"]) == (3, 2, 1, 0)
    assert out["accuracy_a"] == 1.0 and out["accuracy_b"] == pytest.approx(1 / 3)
    exact = pairwise.win_rate("A", "B", None, examples=read_prompts(path))  # "3/2" is not exactly "1.5"
    assert exact["accuracy_a"] == pytest.approx(1 / 3)


def test_win_rate_prompt_file_errors_are_one_line(tmp_path, capsys):
    tok = text_tokenizer()
    ckpt = save_checkpoint(mha_model(tok.vocab_size), tok, tmp_path / "base")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    code = main(["eval", "winrate", "--checkpoint", str(ckpt), "--baseline", str(ckpt), "--prompts", str(path),
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in err
    assert f"{path}:2: the verifier judge needs a reference answer" in err and len(err.splitlines()) == 1
