"""`lmforge rlhf`: LLaMA 2's rounds of rejection sampling, fine-tuning and PPO, learning against a reward model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tinymodels import mha_model, reward_model_dir, save_checkpoint, text_tokenizer

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.model import load_model
from lmforge.model.io import load_weights
from lmforge.peft import load_trained
from lmforge.posttrain.iterative import IterativeRlhfConfig, run_iterative_rlhf

WORDS = "red green blue small large quick slow bright dark warm".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlhf")
    tok = text_tokenizer()
    base = save_checkpoint(mha_model(tok.vocab_size), tok, root / "base")
    rm = reward_model_dir(tok, root / "rm")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {a} {b}"}) + "\n" for a in WORDS[:6] for b in WORDS[4:]))
    return base, rm, prompts


def config(setup, run_dir, **over):
    base, rm, prompts = setup
    data = {"checkpoint": str(base), "run_dir": str(run_dir), "rounds": 2, "prompts": [str(prompts)],
            "reward_model": str(rm), "heldout": 0.25, "eval_max_new_tokens": 6, "device": "cpu",
            "rejection": {"n": 6, "sampling": {"max_new_tokens": 6, "temperature": 1.0},
                          "sft": {"max_len": 48, "eval_tasks": 0,
                                  "train": {"steps": 8, "lr": 1e-2, "device": "cpu", "save_every": 0,
                                            "eval_every": 0, "plot_every": 0}}},
            "ppo": {"samples_per_prompt": 4, "rollout": {"prompts_per_rollout": 4}, "sampling": {"max_new_tokens": 6},
                    "train": {"steps": 8, "lr": 1e-2, "device": "cpu", "eval_every": 0}}}
    for key, value in over.items():
        data[key] = value
    return from_dict(IterativeRlhfConfig, data)


@pytest.mark.slow
def test_two_rounds_raise_the_heldout_reward_and_resume(setup, tmp_path):
    cfg = config(setup, tmp_path / "run")
    out = run_iterative_rlhf(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    # seeded: the random reward model's score of greedy held-out answers rises clearly over two rounds
    assert out["heldout_reward"] > out["heldout_reward_before"] + 0.3, rows
    assert rows[2]["winners"] > 0 and rows[1]["rs_best_of_n_reward"] > rows[1]["rs_mean_reward"]
    assert out["model_dir"] == str(tmp_path / "run" / "round-2" / "ppo" / "model")
    # round 2 fine-tuned on the winners of both rounds (accumulate)
    sft_config = json.loads((tmp_path / "run" / "round-2" / "sft" / "config.json").read_text())
    assert len(sft_config["data"]) == 2
    heldout = (tmp_path / "run" / "prompts" / "heldout.jsonl").read_text().splitlines()
    train = (tmp_path / "run" / "prompts" / "train.jsonl").read_text().splitlines()
    assert len(heldout) == 9 and len(train) == 27 and not set(heldout) & set(train)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2] and all("heldout_reward" in m for m in metrics)
    # a finished run is not overwritten; with --resume and more rounds it continues from round 2's model
    with pytest.raises(LmforgeError, match="already holds 2 finished round"):
        run_iterative_rlhf(cfg)
    finished = rows
    more = run_iterative_rlhf(config(setup, tmp_path / "run", rounds=3, resume=True, with_ppo=False))
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and rows[:3] == finished  # finished rounds kept as they were
    assert more["model_dir"] == str(tmp_path / "run" / "round-3" / "sft" / "model")
    sft_config = json.loads((tmp_path / "run" / "round-3" / "sft" / "config.json").read_text())
    assert sft_config["checkpoint"] == str(tmp_path / "run" / "round-2" / "ppo" / "model")


def test_options_the_recipe_owns_are_refused(setup, tmp_path, capsys):
    base, rm, prompts = setup
    for flag in (["--ppo.run_dir", "x"], ["--rejection.reward_model", str(rm)], ["--ppo.prompts", str(prompts)],
                 ["--rejection.sft.data", "w.jsonl"], ["--ppo.peft.method", "prompt"],
                 ["--rejection.sft.peft.method", "adapter"]):
        code = main(["rlhf", "--checkpoint", str(base), "--reward_model", str(rm), "--run_dir", str(tmp_path / "r"),
                     *flag])
        err = capsys.readouterr().err
        assert code != 0 and flag[0][2:] in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.slow
def test_lora_rounds_merge_each_adapter_before_the_next_stage_samples(setup, tmp_path):
    """With LoRA in the fine-tuning and PPO sections, each stage trains an adapter on the policy it starts from;
    the recipe merges it (RUN/round-K/STAGE/merged) and the next stage and round start from the merged model."""
    train = {"steps": 2, "lr": 1e-2, "device": "cpu", "save_every": 0, "eval_every": 0, "plot_every": 0}
    lora = {"method": "lora", "lora": {"r": 4}}
    cfg = config(setup, tmp_path / "run", rounds=2, rejection={
        "n": 2, "sampling": {"max_new_tokens": 4},
        "sft": {"max_len": 48, "eval_tasks": 0, "train": train, "peft": lora}},
        ppo={"samples_per_prompt": 2, "rollout": {"prompts_per_rollout": 2}, "sampling": {"max_new_tokens": 4},
             "train": train, "peft": lora})
    out = run_iterative_rlhf(cfg)
    run, base = tmp_path / "run", setup[0]
    starts = [str(base)]
    for k in (1, 2):
        for stage in ("sft", "ppo"):
            folder = run / f"round-{k}" / stage
            assert json.loads((folder / "config.json").read_text())["checkpoint"] == starts[-1]
            [adapter] = [p.parent for p in folder.glob("*/adapter_model.safetensors")]  # sft/adapter, ppo/model
            assert not (adapter / "model.safetensors").exists()  # the stage saved its adapter only
            # merged: the start + the adapter, folded into plain weights that moved away from the start
            ids = torch.randint(0, 300, (2, 10))
            with torch.no_grad():
                expected = load_trained(starts[-1], adapter).eval()(ids)
                got = load_model(folder / "merged").eval()(ids)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            before, after = load_weights(Path(starts[-1]) / "model.safetensors"), load_weights(
                folder / "merged" / "model.safetensors")
            assert any(not torch.equal(before[n], after[n]) for n in before)
            starts.append(str(folder / "merged"))
        rejection = json.loads((run / f"round-{k}" / "rejection" / "config.json").read_text())
        assert rejection["checkpoint"] == starts[2 * k - 2]  # round k samples with round k-1's merged policy
    assert out["model_dir"] == starts[-1]
