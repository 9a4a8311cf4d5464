"""The main job end to end on a tiny budget: every stage runs, writes its outputs, and a rerun reuses them."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_reuses_them(tmp_path, capsys):
    run = tmp_path / "qs"
    argv = ["quickstart", "--run-dir", str(run), "--corpus-max-bytes", "400000", "--vocab-size", "512",
            "--sample-tokens", "8", "--pretrain.model.preset", "debug", "--pretrain.train.steps", "30",
            "--pretrain.train.eval-every", "15", "--pretrain.train.save-every", "15",
            "--pretrain.data.seq-len", "64", "--pretrain.data.batch-size", "8", "--pretrain.train.precision", "fp32",
            "--pretrain.train.compile", "false", "--sft.tasks", "200", "--sft.train.steps", "6",
            "--sft.max-len", "64", "--sft.batch-size", "4", "--dpo.synthetic-pairs", "24", "--dpo.train.steps", "3",
            "--dpo.batch-size", "4", "--eval-examples", "6", "--cloze-examples", "10"]
    # the reasoning stage (on by default) is tested on its own in test_reasoning.py
    assert main([*argv, "--skip", "reasoning"]) == 0
    out = capsys.readouterr().out
    assert "samples after pretraining" in out and "lmforge generate --checkpoint" in out
    summary = json.loads((run / "summary.json").read_text())
    pt = summary["stages"]["pretrain"]
    assert pt["val_after"]["loss"] < pt["val_before"]["loss"]
    assert set(summary["stages"]) == {"corpus", "clean", "tokenizer", "shards", "pretrain", "sft", "dpo", "eval"}
    models = summary["stages"]["eval"]["models"]
    assert set(models) == {"base", "sft", "dpo"}
    summary_md = (run / "summary.md").read_text()
    for label, scores in models.items():  # each summary number is the mean of eval/LABEL.json's 6 per-example scores
        records = json.loads((run / "eval" / f"{label}.json").read_text())["tasks"]["synthetic"]["examples"]
        hits = [" ".join(r["prediction"].split()) in {" ".join(a.split()) for a in r["answers"]} for r in records]
        assert len(records) == scores["synthetic"]["n"] == 6
        assert scores["synthetic"]["exact_match"] == sum(hits) / 6
        shown = f"{label} {scores['synthetic']['exact_match']:.3f}"  # and the printout and summary.md show it
        assert shown in out and shown in summary_md, shown
    for path in ["corpus/corpus.jsonl", "clean/stats.json", "clean/kept", "tokenizer/tokenizer.json",
                 "shards/train/index.json", "shards/val/index.json", "pretrain/metrics.jsonl", "pretrain/loss.png",
                 "pretrain/model/model.safetensors",
                 "pretrain/model/tokenizer.json", "sft/model/model.safetensors", "dpo/model/adapter_config.json",
                 "eval/base.json", "eval/decontam.json", "summary.md", "report.html"]:
        assert (run / path).exists(), path

    assert main([*argv, "--skip", "reasoning"]) == 0  # second run reuses every finished stage
    out = capsys.readouterr().out
    assert out.count("reusing") == 8

    # one stage rerun alone, an optional one skipped
    assert main([*argv, "--rerun", "dpo", "--skip", "eval", "reasoning"]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing") == 6 and "dpo ..." in out and "eval: skipped" in out

    # an interrupted pretraining (no done.json) resumes from its last checkpoint instead of starting over
    (run / "pretrain" / "done.json").unlink()
    assert main([*argv, "--skip", "reasoning", "--pretrain.train.steps", "45"]) == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.err and "from step 30" in captured.err
    assert json.loads((run / "summary.json").read_text())["stages"]["pretrain"]["steps"] == 45


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["moe", "t5", "mla", "prefix"])
def test_quickstart_other_architectures(tmp_path, capsys, arch):
    run = tmp_path / arch
    small = ["--pretrain.model.d-model", "64", "--pretrain.model.n-heads", "2", "--pretrain.model.n-kv-heads", "2",
             "--pretrain.model.d-ff", "128", "--pretrain.model.n-layers", "2"]
    argv = ["quickstart", "--arch", arch, "--run-dir", str(run), "--corpus-max-bytes", "200000", "--vocab-size", "384",
            "--sample-tokens", "6", *small, "--pretrain.train.steps", "12", "--pretrain.train.eval-every", "0",
            "--pretrain.data.seq-len", "64", "--pretrain.data.batch-size", "8", "--pretrain.train.precision", "fp32",
            "--pretrain.train.compile", "false", "--sft.tasks", "100", "--sft.train.steps", "3", "--sft.max-len", "64",
            "--sft.batch-size", "4", "--dpo.synthetic-pairs", "12", "--dpo.train.steps", "2", "--dpo.batch-size", "4",
            "--eval-examples", "4", "--cloze-examples", "4", "--skip", "reasoning"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "pretrain" / "model" / "config.json").read_text())["model"]
    assert config["d_model"] == 64 and config["n_layers"] == 2  # the user's sizes on top of the arch's preset
    if arch == "moe":
        assert config["moe_experts"] == 8 and config["moe_top_k"] == 2
        assert set(summary["stages"]) >= {"sft", "dpo", "eval"} and "lmforge serve --checkpoint" in out
        assert "moe_load_max_mean" in (run / "pretrain" / "metrics.jsonl").read_text()
    elif arch == "mla":
        assert config["attention"] == "mla" and (run / "dpo" / "model" / "adapter_config.json").is_file()
    elif arch == "prefix":
        assert json.loads((run / "pretrain" / "config.json").read_text())["objective"] == "prefix_lm"
        assert config["prefix_lm"] and "lmforge chat --checkpoint" in out and "lmforge serve" not in out
    else:
        assert config["arch"] == "encdec" and config["n_encoder_layers"] == 3
        assert {"sft", "dpo", "eval"}.isdisjoint(summary["stages"]) and "lmforge chat" not in out
        assert all("<span>" in s for s in summary["stages"]["pretrain"]["samples_after"])
    assert main(["quickstart", "--arch", "mo"]) == 2
    assert "unknown architecture 'mo' (did you mean 'moe'?)" in capsys.readouterr().err
