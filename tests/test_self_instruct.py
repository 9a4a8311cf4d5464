import json

import numpy as np
import pytest
from textdata import shared_file
from tinymodels import task_model_dir as tiny_model_dir

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.posttrain.self_instruct import (
    SelfInstructConfig,
    Task,
    instance_prompt,
    instruction_prompt,
    keyword_reject,
    lcs_lengths,
    parse_instance,
    parse_instructions,
    read_seed_tasks,
    rouge_l,
    rouge_tokens,
    self_instruct,
)


def lcs_reference(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def test_lcs_matches_the_textbook_dynamic_program():
    rng = np.random.default_rng(0)
    words = list("abcdef")
    cand = [words[i] for i in rng.integers(0, 6, 12)]
    refs = [[words[i] for i in rng.integers(0, 6, n)] for n in (0, 1, 5, 9, 15, 20)]
    assert lcs_lengths(cand, refs).tolist() == [lcs_reference(cand, r) for r in refs]
    assert lcs_lengths([], refs).tolist() == [0] * len(refs)


def test_rouge_l_hand_cases():
    # "the cat sat on the mat" vs "the cat lay on the mat": LCS = 5 of 6 and 6 -> F1 = 5/6
    assert rouge_l("The cat sat on the mat.", ["the cat lay on the mat"])[0] == pytest.approx(5 / 6)
    # P = 2/2, R = 2/4 -> F1 = 2PR/(P+R) = 2/3
    assert rouge_l("cat mat", ["the cat on mat"])[0] == pytest.approx(2 / 3)
    assert rouge_l("Identical, words!", ["identical words"])[0] == pytest.approx(1.0)
    assert rouge_l("nothing shared", ["other text"])[0] == 0.0
    assert rouge_tokens("Hello, World-2!") == ["hello", "world", "2"]
    assert rouge_l("x", []).shape == (0,)


def test_rouge_l_agrees_with_rouge_score_when_installed():
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_score.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("Give three tips for staying healthy.", "What are three tips for staying healthy?"),
             ("Sort the numbers in ascending order", "Sort these numbers from the smallest to the largest")]
    for a, b in pairs:
        assert rouge_l(a, [b])[0] == pytest.approx(scorer.score(b, a)["rougeL"].fmeasure)


@pytest.mark.parametrize("instruction, reason", [
    ("Describe the image below.", "blocked keyword: image"),
    ("Draw a cat for me please.", "blocked keyword: draw"),
    ("Plot the sales figures by month.", "blocked keyword: plot"),
    ("Go to the store and buy milk.", "blocked keyword: go to"),
    ("Read this file and summarize it.", "blocked keyword: file"),
    ("Make a map of the city.", "blocked keyword: map"),
    ("Look at this graph and explain it.", "blocked keyword: graph"),
    ("Show me a picture of a dog.", "blocked keyword: picture"),
    ("Hi there", "too short"),
    (" ".join(["word"] * 151), "too long"),
    ("- List three colors you like.", "starts with punctuation"),
    ("Translate café into English words.", "non-ASCII"),
    ("Write a program that adds two numbers.", "starts with: write a program"),
])
def test_keyword_rules_reject(instruction, reason):
    assert keyword_reject(instruction).startswith(reason)


@pytest.mark.parametrize("instruction", [
    "Give three tips for staying healthy.",
    "Explain why the sky is blue to a child.",
    "Summarize the mapping between words and numbers.",  # "mapping" is not "map"
    "Classify the sentiment of this review as positive or negative.",
])
def test_keyword_rules_pass(instruction):
    assert keyword_reject(instruction) is None


def test_prompts_and_parsing():
    tasks = [Task("Say hello.", "", "hello"), Task("Add two numbers.", "2, 3", "5")]
    prompt = instruction_prompt(tasks)
    assert prompt.endswith("Task 2: Add two numbers.\nTask 3:")
    parsed = parse_instructions(" Name a fruit.\nTask 4: Name a color.\nTask 5:  \n")
    assert parsed == ["Name a fruit.", "Name a color."]
    assert instance_prompt(tasks[:1], "Name a fruit.").endswith("Output: hello\n\nInstruction: Name a fruit.\nInput:")
    assert parse_instance(" <noinput>\nOutput: apple\n\nInstruction: next") == ("", "apple")
    assert parse_instance(" 2, 3\nOutput: 5") == ("2, 3", "5")
    assert parse_instance(" something without an output") is None


def scripted_generator():
    """A fake LM: instruction requests get fixed continuations, instance requests an answer."""
    replies = iter([
        " Name three animals that live in the ocean.\nTask 10: Describe the image of a sunset.\n"
        "Task 11: Name three animals that live in the sea.\nTask 12: ok",
        " Explain how rainbows form after a storm.\nTask 10: Translate the sentence into French words.",
    ] * 10)

    def generate(prompts):
        out = []
        for p in prompts:
            if p.rstrip().endswith("Input:"):
                out.append(" <noinput>\nOutput: an answer\n\nInstruction:")
            else:
                assert p.startswith("Come up with a series of tasks:") and p.count("\nTask ") == 9
                out.append(next(replies))
        return out
    return generate


def test_pipeline_filters_and_writes_alpaca_records():
    seeds = [Task(f"Seed instruction number {i} about topic {i}.", "", f"out {i}") for i in range(10)]
    cfg = SelfInstructConfig(num_instructions=3, requests_per_round=2, max_rounds=3)
    result = self_instruct(cfg, seeds, scripted_generator())
    kept = [t.instruction for t in result.kept]
    assert kept == ["Name three animals that live in the ocean.", "Explain how rainbows form after a storm.",
                    "Translate the sentence into French words."]
    assert all(t.output == "an answer" and t.input == "" for t in result.kept)
    reasons = {r["instruction"]: r["reason"] for r in result.rejected}
    assert reasons["Describe the image of a sunset."] == "blocked keyword: image"
    assert reasons["ok"].startswith("too short")
    assert reasons["Name three animals that live in the sea."].startswith("ROUGE-L: 0.88")  # LCS 7 of 8 words
    assert result.counts["kept"] == 3 and result.counts["blocked keyword"] >= 1 and result.counts["ROUGE-L"] >= 1


def test_real_seed_tasks_and_cli_with_a_tiny_random_model(tmp_path):
    seeds_path = shared_file("self_instruct_seed_tasks.jsonl")
    if seeds_path is None:
        pytest.skip("shared/data/self_instruct_seed_tasks.jsonl not present")
    seeds = read_seed_tasks(seeds_path)
    assert len(seeds) == 175 and seeds[1].input.startswith("Night : Day")
    ckpt = tiny_model_dir(tmp_path / "model", max_seq_len=512)
    code = main(["self-instruct", "--checkpoint", str(ckpt), "--seed_tasks", str(seeds_path), "--run_dir",
                 str(tmp_path / "si"), "--num_instructions", "4", "--requests_per_round", "4", "--max_rounds", "2",
                 "--sampling.max_new_tokens", "24", "--device", "cpu"])
    assert code == 0
    stats = json.loads((tmp_path / "si" / "stats.json").read_text())
    records = json.loads((tmp_path / "si" / "instructions.json").read_text())
    rejected = [json.loads(line) for line in (tmp_path / "si" / "rejected.jsonl").read_text().splitlines()]
    assert stats["rounds"] <= 2 and stats["generated"] >= 8  # garbage in, but the pipeline ran
    assert stats["kept"] == len(records) and len(rejected) >= stats["generated"] - len(records)
    assert all(set(r) == {"instruction", "input", "output"} and keyword_reject(r["instruction"]) is None
               for r in records)
    assert all(r["reason"] for r in rejected)


def test_bad_seed_file(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "ok", "instances": [{"input": "", "output": "x"}]}\n{"name": "x"}\n')
    with pytest.raises(LmforgeError, match="seeds.jsonl:2: missing field 'instruction'"):
        read_seed_tasks(bad)
