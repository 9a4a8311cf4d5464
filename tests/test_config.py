from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from lmforge.cli import main
from lmforge.core.config import from_dict, option, parse_config, to_dict
from lmforge.core.errors import ConfigError
from lmforge.model import ModelConfig


@dataclass
class Opt:
    lr: float = option(3e-4, "peak learning rate")
    steps: int = option(10, "optimizer steps")
    precision: Literal["fp32", "bf16"] = option("fp32", "compute precision")
    compile: bool = option(False, "torch.compile")
    tags: list[str] = option(default_factory=list, help="labels")
    note: str | None = option(None, "optional")


@dataclass
class Root:
    run_dir: str = option("runs/x", "where outputs go")
    train: Opt = option(default_factory=Opt, help="training")
    model: ModelConfig = option(default_factory=ModelConfig, help="model")


def test_defaults_recipe_and_overrides_layer(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('run_dir = "a"\n[train]\nlr = 1e-3\nsteps = 5\n[model]\npreset = "debug"\nn_layers = 3\n')
    cfg, _ = parse_config(Root, [str(recipe), "--train.steps", "7", "--train.compile", "--train.tags", "a", "b"],
                          prog="t")
    assert cfg.run_dir == "a" and cfg.train.lr == 1e-3 and cfg.train.steps == 7
    assert cfg.train.compile is True and cfg.train.tags == ["a", "b"]
    # preset values apply, keys beside the preset override them
    assert cfg.model.d_model == 64 and cfg.model.n_layers == 3 and cfg.model.n_kv_heads == 2


def test_yaml_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  precision: bf16\n  note: hi\n")
    cfg, _ = parse_config(Root, [str(recipe)], prog="t")
    assert cfg.train.precision == "bf16" and cfg.train.note == "hi"


def test_dashed_and_underscored_flags_are_the_same_option():
    cfg, _ = parse_config(Root, ["--run-dir", "b", "--model.max-seq-len", "64"], prog="t")
    assert cfg.run_dir == "b" and cfg.model.max_seq_len == 64


@pytest.mark.parametrize("argv, needle", [
    (["--train.lrr", "1"], "unknown option '--train.lrr' (did you mean '--train.lr'?)"),
    (["--train.steps", "ten"], "train.steps: expected an integer, got 'ten'"),
    (["--train.precision", "fp8"], "train.precision: 'fp8' is not one of fp32, bf16"),
    (["--model.preset", "llama3-8"], "unknown model preset 'llama3-8' (did you mean 'llama3-8b'?)"),
    (["--model.n_heads", "3", "--model.n_kv_heads", "2"], "must be a multiple"),
])
def test_bad_command_lines_are_one_line_errors(argv, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(Root, argv, prog="t")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_recipe_key_suggests_the_closest(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nstesp = 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stesp' \(did you mean 'train.steps'\?\)"):
        parse_config(Root, [str(recipe)], prog="t")
    recipe.write_text("[train\nsteps = 3\n")
    with pytest.raises(ConfigError, match="cannot parse recipe"):
        parse_config(Root, [str(recipe)], prog="t")


def test_round_trip_through_dict():
    cfg = from_dict(Root, {"train": {"steps": 3}, "model": {"preset": "tiny", "vocab_size": 100}})
    again = from_dict(Root, to_dict(cfg))
    assert again == cfg


def test_cli_unknown_command_and_option_exit_with_one_line(capsys):
    assert main(["pretrian"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lmforge: error: unknown command 'pretrian' (did you mean 'pretrain'?); run 'lmforge --help'"
    assert main(["generate", "--checkpoint", "x", "--temprature", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "did you mean '--sampling.temperature'" in err and len(err.splitlines()) == 1


def test_every_command_help_lists_its_options_with_defaults(capsys):
    from lmforge.cli import COMMANDS

    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    for name in COMMANDS:
        assert name in top
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([*name.split(), "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "(default:" in out, name


@dataclass
class Outer:
    root: Root = option(default_factory=lambda: Root(run_dir="custom",
                                                     model=from_dict(ModelConfig, {"preset": "tiny"})),
                        help="a section whose default differs from its class's defaults")


def test_section_defaults_survive_partial_overrides_and_show_in_help(capsys):
    cfg, _ = parse_config(Outer, ["--root.train.steps", "3"], prog="t")
    assert cfg.root.run_dir == "custom" and cfg.root.model.d_model == 256 and cfg.root.train.steps == 3
    cfg, _ = parse_config(Outer, ["--root.model.preset", "debug"], prog="t")
    assert cfg.root.model.d_model == 64
    with pytest.raises(SystemExit):
        parse_config(Outer, ["--help"], prog="t")
    assert '(default: "custom")' in capsys.readouterr().out
