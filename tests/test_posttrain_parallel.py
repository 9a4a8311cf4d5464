"""Post-training stages on torchrun (CPU, gloo): 2 processes under ddp and fsdp repeat one process's losses and
weights for sft, dpo (LoRA on a sharded base too), reward, rejection sampling, grpo and ppo; RL stages resume
exactly; activation checkpointing works in one process; a parallel
option that would be ignored is an error.

Quick checks run in-process (a lone process with parallel.data=fsdp forms a world of one: the sharded path,
gathered evaluation, DCP checkpoints and the rank-0 export); the torchrun launches are marked slow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tinymodels import reward_model_dir, task_model_dir, task_tokenizer

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.model import load_model
from lmforge.model.io import load_weights
from lmforge.parallel import ParallelConfig
from lmforge.parallel.checkpointing import checkpointed_blocks, transformer_blocks
from lmforge.posttrain import stage as stage_module
from lmforge.posttrain.dpo import DpoConfig, run_dpo
from lmforge.posttrain.grpo import GrpoConfig, run_grpo
from lmforge.posttrain.ppo import PolicyWithValue
from lmforge.posttrain.reward import RewardModel
from lmforge.posttrain.sft import SftConfig, run_sft
from lmforge.train import pretrain as pretrain_module
from lmforge.train.pretrain import PretrainConfig, pretrain
from recipes import losses, run_cli

REL = 1e-5  # fp32 reductions in another order only
TRAIN = {"steps": 4, "lr": 3e-3, "warmup_steps": 0, "min_lr_ratio": 1.0, "precision": "fp32", "device": "cpu",
         "log_every": 1, "eval_every": 0, "save_every": 2, "keep_checkpoints": 0, "plot_every": 0}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return task_model_dir(tmp_path_factory.mktemp("ptdist") / "base", max_seq_len=64)


def recipe(stage: str, base: Path, root: Path, **extra: Any) -> dict[str, Any]:
    """A few-step recipe of `stage` on the task model (checkpoints at step 2 and 4, constant lr)."""
    common = {"checkpoint": str(base), "train": dict(TRAIN)}
    if stage == "sft":
        cfg = {**common, "tasks": 48, "eval_tasks": 0, "max_len": 48, "batch_size": 4}
    elif stage in ("dpo", "reward"):
        cfg = {**common, "synthetic_pairs": 48, "heldout": 0.1, "max_len": 48, "batch_size": 4}
    elif stage in ("grpo", "ppo"):
        rm = reward_model_dir(task_tokenizer(), root / "rm")
        cfg = {**common, "epochs": 1, "minibatches": 2, "rollout": {"prompts_per_rollout": 4, "eval_prompts": 0},
               "reward": "model", "reward_model": str(rm), "sampling": {"max_new_tokens": 6},
               ("group_size" if stage == "grpo" else "samples_per_prompt"): 4}
        cfg["train"] = {**TRAIN, "lr": 3e-3}
    else:  # rejection-sample
        cfg = {"checkpoint": str(base), "tasks": 8, "n": 2, "sampling": {"max_new_tokens": 6, "seed": 0},
               "min_reward": 0.0, "sft": {"eval_tasks": 0, "max_len": 48, "batch_size": 4, "train": dict(TRAIN)}}
    return {**cfg, **extra}


def launch(stage: str, config: dict[str, Any], run_dir: Path, nproc: int = 2, *overrides: str) -> None:
    """torchrun --nproc-per-node N -m lmforge STAGE RECIPE (the documented launch)."""
    path = run_dir.parent / f"{run_dir.name}.json"
    path.write_text(json.dumps(config))
    command = ["-m", "lmforge", stage, str(path), "--run_dir", str(run_dir), *overrides]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *command]
    out = run_cli(command, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def same_files(a: Path, b: Path, names: tuple[str, ...]) -> None:
    for name in names:
        wa, wb = load_weights(a / name), load_weights(b / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            if name == "reward_head.safetensors" and key == "bias":
                continue  # its gradient cancels in r_w - r_l: 0 up to rounding, which Adam scales up to +-lr
            torch.testing.assert_close(wb[key], wa[key], atol=1e-4, rtol=0)  # Adam: lr 3e-3 x float noise


# ----------------------------------------------------------------------------------------------
# quick: one process


def test_ignored_parallel_options_are_errors():
    for fields, key in [({"reshard_after_forward": False}, "reshard_after_forward"),
                        ({"data": "ddp", "reshard_after_forward": False}, "reshard_after_forward"),
                        ({"data": "ddp", "param_dtype": "bf16"}, "param_dtype"),
                        ({"reduce_dtype": "fp32"}, "reduce_dtype"),
                        ({"ac_every": 3}, "ac_every"),
                        ({"activation_checkpointing": "full", "ac_every": 3}, "ac_every"),
                        ({"backend": "gloo"}, "backend")]:
        with pytest.raises(ConfigError, match=f"parallel.{key}"):
            ParallelConfig(**fields)
    ParallelConfig(data="fsdp", reshard_after_forward=False, param_dtype="bf16", reduce_dtype="bf16")
    ParallelConfig(activation_checkpointing="every_n", ac_every=3)
    with pytest.raises(ConfigError, match="parallel.tensor must be 1 for a post-training stage"):
        run_sft(from_dict(SftConfig, {"checkpoint": "missing", "parallel": {"tensor": 2}}))


def test_wrapped_models_expose_their_blocks(base):
    policy = load_model(base)
    n = len(policy.blocks)
    assert n >= 2
    assert transformer_blocks(RewardModel(policy)) == transformer_blocks(PolicyWithValue(policy)) == list(policy.blocks)


def test_activation_checkpointing_one_process(base, tmp_path, learnable_data, monkeypatch):
    """Applied (and counted) in a one-process stage and in one-process pretraining; same losses as without."""
    counted = []
    real = stage_module.apply_activation_checkpointing

    def counting(model, mode, every=2):
        n = real(model, mode, every)
        counted.append((n, checkpointed_blocks(model)))
        return n

    monkeypatch.setattr(stage_module, "apply_activation_checkpointing", counting)
    monkeypatch.setattr(pretrain_module, "apply_activation_checkpointing", counting)
    curves = {}
    for mode in ("none", "full"):
        run_sft(from_dict(SftConfig, {**recipe("sft", base, tmp_path), "run_dir": str(tmp_path / f"sft_{mode}"),
                                      "parallel": {"activation_checkpointing": mode}}))
        curves[mode] = losses(tmp_path / f"sft_{mode}")
    n_blocks = len(load_model(base).blocks)
    assert counted == [(0, 0), (n_blocks, n_blocks)]
    assert curves["full"] == pytest.approx(curves["none"], rel=REL) and len(curves["none"]) == TRAIN["steps"]

    recipe_pt = {"data": {"path": str(learnable_data), "seq_len": 16, "batch_size": 4},
                 "model": {"preset": "debug", "vocab_size": 64, "max_seq_len": 32}, "train": {**TRAIN, "steps": 3}}
    for mode in ("none", "every_n"):
        out = tmp_path / f"pt_{mode}"
        pretrain(from_dict(PretrainConfig, {**recipe_pt, "run_dir": str(out),
                                            "parallel": {"activation_checkpointing": mode}}))
        curves[f"pt_{mode}"] = losses(out)
    assert curves["pt_every_n"] == pytest.approx(curves["pt_none"], rel=REL)
    assert counted[2:] == [(0, 0), (1, 1)]  # every_n with ac_every 2: block 0 of the debug model's 2


def test_fsdp_world_of_one_repeats_plain_sft_and_dpo_lora(base, tmp_path):
    """The sharded path in one process (no launcher): same losses, same saved model/adapter as the plain run."""
    for stage, run, cfg_type, extra, saved in [
            ("sft", run_sft, SftConfig, {}, ("model", "model.safetensors")),
            ("dpo", run_dpo, DpoConfig, {"peft": {"method": "lora"}}, ("model", "adapter_model.safetensors"))]:
        for kind in ("plain", "fsdp"):
            parallel = {"data": "fsdp"} if kind == "fsdp" else {}
            run(from_dict(cfg_type, {**recipe(stage, base, tmp_path), **extra, "parallel": parallel,
                                     "run_dir": str(tmp_path / f"{stage}_{kind}")}))
        assert losses(tmp_path / f"{stage}_fsdp") == pytest.approx(losses(tmp_path / f"{stage}_plain"), rel=REL)
        assert (tmp_path / f"{stage}_fsdp" / "checkpoints" / "step_000004" / ".metadata").is_file()
        folder, name = saved
        same_files(tmp_path / f"{stage}_plain" / folder, tmp_path / f"{stage}_fsdp" / folder, (name,))


def test_rl_groups_are_never_split_over_ranks(base, tmp_path, monkeypatch):
    monkeypatch.setattr(stage_module.Stage, "dp_size", property(lambda self: 2))
    cfg = from_dict(GrpoConfig, {**recipe("grpo", base, tmp_path), "run_dir": str(tmp_path / "grpo"),
                                 "rollout": {"prompts_per_rollout": 3}})
    with pytest.raises(ConfigError, match="prompts_per_rollout must be a multiple of the 2 data-parallel"):
        run_grpo(cfg)
    with pytest.raises(ConfigError, match="batch_size must be a multiple of the 2 data-parallel"):
        run_dpo(from_dict(DpoConfig, {**recipe("dpo", base, tmp_path), "batch_size": 3,
                                      "run_dir": str(tmp_path / "dpo")}))


# ----------------------------------------------------------------------------------------------
# slow: torchrun, 2 processes


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo", "reward"])
def test_two_processes_repeat_one_process(stage, base, tmp_path):
    config = recipe(stage, base, tmp_path)
    launch(stage, config, tmp_path / "one", 1)
    one = losses(tmp_path / "one")
    assert len(one) == TRAIN["steps"] and one[-1] < one[0]
    names = ("model.safetensors", "reward_head.safetensors") if stage == "reward" else ("model.safetensors",)
    for kind in ("ddp", "fsdp"):
        launch(stage, config, tmp_path / kind, 2, "--parallel.data", kind)
        assert losses(tmp_path / kind) == pytest.approx(one, rel=REL), kind
        same_files(tmp_path / "one" / "model", tmp_path / kind / "model", names)
        assert (tmp_path / kind / "logs" / "rank_1.log").is_file()


@pytest.mark.slow
def test_dpo_lora_on_sharded_base_and_resume_under_two_processes(base, tmp_path):
    """LoRA on an FSDP-sharded frozen base repeats one process; a 2-process run stopped at step 2 and resumed
    repeats the uninterrupted one."""
    config = recipe("dpo", base, tmp_path, peft={"method": "lora"})
    launch("dpo", config, tmp_path / "one", 1)
    launch("dpo", config, tmp_path / "fsdp", 2, "--parallel.data", "fsdp")
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=REL)
    same_files(tmp_path / "one" / "model", tmp_path / "fsdp" / "model", ("adapter_model.safetensors",))
    launch("dpo", config, tmp_path / "cut", 2, "--parallel.data", "fsdp", "--train.steps", "2")
    launch("dpo", config, tmp_path / "cut", 2, "--parallel.data", "fsdp", "--resume", "true")
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "fsdp"), rel=REL)


@pytest.mark.slow
def test_rejection_sampling_two_processes_repeat_one(base, tmp_path):
    """Ranks sample their own prompt chunks, seeded by position: the same samples and the same fine-tuning."""
    config = recipe("rejection-sample", base, tmp_path)
    launch("rejection-sample", config, tmp_path / "one", 1)
    launch("rejection-sample", config, tmp_path / "two", 2, "--parallel.data", "fsdp")
    for name in ("samples.jsonl", "winners.jsonl"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    assert losses(tmp_path / "two" / "sft") == pytest.approx(losses(tmp_path / "one" / "sft"), rel=REL)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_two_processes_repeat_one_process_and_resume(stage, base, tmp_path):
    """Each rank samples half the rollout's prompts, each prompt seeded by its place in the rollout, and the ranks
    put the halves together and train on slices of the same global minibatches: 2 processes under ddp and fsdp
    (sharded training, gathered sampling) repeat one process's losses and weights (to float rounding: a prompt's
    samples come from a differently padded batch, gradients are summed in another order); a run resumed at a
    rollout boundary repeats the uninterrupted one."""
    config = recipe(stage, base, tmp_path)
    launch(stage, config, tmp_path / "one", 1)
    one = losses(tmp_path / "one")
    assert len(one) == TRAIN["steps"] and any(abs(v) > 1e-6 for v in one)
    for kind in ("ddp", "fsdp"):
        launch(stage, config, tmp_path / kind, 2, "--parallel.data", kind)
        assert losses(tmp_path / kind) == pytest.approx(one, rel=1e-4, abs=1e-6), kind
        wa, wb = (load_weights(tmp_path / run / "model" / "model.safetensors") for run in ("one", kind))
        assert wa.keys() == wb.keys()
        lr = config["train"]["lr"]
        for key in wa:  # Adam turns rounding noise in a ~0 gradient into a step of up to +-lr: rare, bounded
            diff = (wb[key] - wa[key]).abs()
            assert diff.max() <= lr * TRAIN["steps"] and (diff > 1e-4).float().mean() < 1e-3, (kind, key)
    launch(stage, config, tmp_path / "cut", 2, "--parallel.data", "fsdp", "--train.steps", "2")
    launch(stage, config, tmp_path / "cut", 2, "--parallel.data", "fsdp", "--resume", "true")
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "fsdp"), rel=1e-4, abs=1e-6)
