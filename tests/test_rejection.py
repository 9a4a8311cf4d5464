import json

import pytest
from tinymodels import task_model as tiny_model
from tinymodels import task_model_dir as tiny_model_dir
from tinymodels import task_tokenizer as tiny_tokenizer

import lmforge.posttrain.rejection as rejection
from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.posttrain.rejection import RejectionConfig, best_of_n, run_rejection
from lmforge.tasks.suite import make_examples


def test_best_of_n_groups_and_ties():
    assert best_of_n([0.0, 1.0, 1.0, 0.2, 0.1, 0.3], 3) == [(1, 1.0), (5, 0.3)]
    assert best_of_n([0.5, 0.5], 1) == [(0, 0.5), (1, 0.5)]
    with pytest.raises(ValueError):
        best_of_n([1.0, 2.0, 3.0], 2)


def test_verifier_keeps_only_correct_winners_then_sft(tmp_path, monkeypatch):
    ckpt = tiny_model_dir(tmp_path / "base")
    examples = make_examples(6, seed=0)

    def fake_complete(model, tokenizer, prompts, params, num_return_sequences=1, **_):
        # sample 2 of prompt i is right for even i; everything else is wrong
        out = []
        for i, (prompt, e) in enumerate(zip(prompts, examples)):
            assert prompt == [{"role": "user", "content": e.prompt}]
            out += [e.answer if (s == 2 and i % 2 == 0) else "wrong" for s in range(num_return_sequences)]
        return out

    monkeypatch.setattr(rejection, "complete", fake_complete)
    cfg = from_dict(RejectionConfig, {
        "checkpoint": str(ckpt), "tasks": 6, "n": 4, "run_dir": str(tmp_path / "rs"),
        "sft": {"eval_tasks": 6, "max_len": 64, "train": {"steps": 2, "device": "cpu", "save_every": 0}}})
    out = run_rejection(cfg)
    assert out["prompts"] == 6 and out["samples"] == 24 and out["winners"] == 3
    assert out["mean_reward"] == pytest.approx(3 / 24) and out["best_of_n_reward"] == pytest.approx(0.5)
    winners = [json.loads(line) for line in (tmp_path / "rs" / "winners.jsonl").read_text().splitlines()]
    assert [w["messages"][-1]["content"] for w in winners] == [examples[i].answer for i in (0, 2, 4)]
    assert all(w["reward"] == 1.0 for w in winners)
    assert out["sft_steps"] == 2 and (tmp_path / "rs" / "sft" / "model" / "tokenizer.json").is_file()


def test_reward_model_scoring_picks_the_argmax(tmp_path):
    from lmforge.posttrain.reward import RewardModel, save_reward_model

    ckpt = tiny_model_dir(tmp_path / "base")
    rm_dir = save_reward_model(RewardModel(tiny_model(seed=1)), tmp_path / "rm")
    tiny_tokenizer().save(rm_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"copy: {c}", "output": c}) + "\n" for c in "abc"))
    code = main(["rejection-sample", "--checkpoint", str(ckpt), "--prompts", str(prompts), "--tasks", "0",
                 "--n", "3", "--reward_model", str(rm_dir), "--finetune", "false", "--run_dir", str(tmp_path / "rs"),
                 "--sampling.max_new_tokens", "6"])
    assert code == 0
    samples = [json.loads(line) for line in (tmp_path / "rs" / "samples.jsonl").read_text().splitlines()]
    winners = [json.loads(line) for line in (tmp_path / "rs" / "winners.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(len(s["rewards"]) == 3 for s in samples)
    for s, w in zip([s for s in samples if any(r.strip() for r in s["responses"])], winners):
        assert w["reward"] == max(r for r, text in zip(s["rewards"], s["responses"]) if text.strip())
        assert w["messages"][:-1] == s["prompt"] == [{"role": "user", "content": w["messages"][0]["content"]}]


def test_bad_inputs(tmp_path):
    ckpt = tiny_model_dir(tmp_path / "base")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    with pytest.raises(LmforgeError, match="set reward_model"):
        run_rejection(RejectionConfig(checkpoint=str(ckpt), prompts=[str(prompts)], tasks=0,
                                      run_dir=str(tmp_path / "r")))
    with pytest.raises(LmforgeError, match="no prompts"):
        run_rejection(RejectionConfig(checkpoint=str(ckpt), tasks=0, run_dir=str(tmp_path / "r")))
    # a random model never answers correctly: nothing to fine-tune on is a clear error
    with pytest.raises(LmforgeError, match="no sample reached min_reward"):
        run_rejection(from_dict(RejectionConfig, {"checkpoint": str(ckpt), "tasks": 4, "n": 2,
                                                  "run_dir": str(tmp_path / "r2"),
                                                  "sampling": {"max_new_tokens": 4}}))
