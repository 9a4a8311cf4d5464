"""HF interop: lmforge logits match transformers' LLaMA/Qwen2/Mistral logits both ways, and bad input
fails with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from lmforge import cli  # noqa: E402
from lmforge.core.config import from_dict  # noqa: E402
from lmforge.core.errors import LmforgeError  # noqa: E402
from lmforge.model import ModelConfig, Transformer, load_model, save_model  # noqa: E402
from lmforge.model.hf.convert import from_hf, to_hf  # noqa: E402
from lmforge.model.hf.registry import (  # noqa: E402
    hf_config_from_model,
    model_config_from_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)

VOCAB = 203
TINY = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64)
HF_VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "attention-bias": dict(num_key_value_heads=2, attention_bias=True),
    "mlp-bias-theta": dict(num_key_value_heads=2, mlp_bias=True, rope_theta=500000.0, rms_norm_eps=1e-5),
}
LMFORGE_VARIANTS = {
    "gqa": {},
    "mha-tied": dict(n_kv_heads=4, tie_embeddings=True),
    "mqa": dict(n_kv_heads=1),
    "qkv-bias": dict(qkv_bias=True),
    "bias-head-dim": dict(bias=True, head_dim=8),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (biases and norm gains included), so a mis-mapped tensor cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def hf_logits(model) -> torch.Tensor:
    return model(input_ids()).logits


@torch.no_grad()
def our_logits(model_dir: Path) -> torch.Tensor:
    return load_model(model_dir)(input_ids())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def save_hf(tmp_path: Path, family: str = "llama", **overrides):
    """A tiny random HF model saved as safetensors; returns (model, directory)."""
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig}[family]
    config = config_cls(**{**TINY, **overrides}, attn_implementation="eager")
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "mistral": transformers.MistralForCausalLM}[family]
    model = randomize(model_cls(config))
    directory = tmp_path / f"hf-{family}"
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory


def load_hf(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def save_ours(tmp_path: Path, **overrides) -> Path:
    cfg = from_dict(ModelConfig, {"preset": "debug", "vocab_size": VOCAB, **overrides})
    return save_model(randomize(Transformer(cfg)), tmp_path / "ours")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop transformers' progress bars from earlier steps
    code = cli.main(argv)
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# numeric parity


@pytest.mark.parametrize("name", HF_VARIANTS)
def test_from_hf_matches_hf_logits_and_round_trips(tmp_path, name):
    hf_model, hf_dir = save_hf(tmp_path, **HF_VARIANTS[name])
    ours = from_hf(hf_dir, tmp_path / "ours")
    cfg, hf_cfg = load_model(ours).cfg, hf_model.config
    assert (cfg.norm_eps, cfg.rope_theta, cfg.n_kv_heads, cfg.tie_embeddings) == (
        hf_cfg.rms_norm_eps, hf_cfg.rope_parameters["rope_theta"], hf_cfg.num_key_value_heads,
        hf_cfg.tie_word_embeddings)
    expected = hf_logits(hf_model)
    assert max_diff(our_logits(ours), expected) < 1e-4
    back = load_hf(to_hf(ours, tmp_path / "back"))
    assert max_diff(hf_logits(back), expected) < 1e-4
    assert back.config.tie_word_embeddings == hf_model.config.tie_word_embeddings


@pytest.mark.parametrize("name", LMFORGE_VARIANTS)
def test_to_hf_loads_in_transformers_with_same_logits(tmp_path, name):
    ours = save_ours(tmp_path, **LMFORGE_VARIANTS[name])
    hf_dir = to_hf(ours, tmp_path / "hf")
    hf_model = load_hf(hf_dir)
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert max_diff(hf_logits(hf_model), our_logits(ours)) < 1e-4


def test_qwen2_with_qkv_bias(tmp_path):
    hf_model, hf_dir = save_hf(tmp_path, "qwen2", num_key_value_heads=2)
    ours = from_hf(hf_dir, tmp_path / "ours")
    cfg = load_model(ours).cfg
    assert cfg.qkv_bias and not cfg.bias
    expected = hf_logits(hf_model)
    assert max_diff(our_logits(ours), expected) < 1e-4
    assert max_diff(hf_logits(load_hf(to_hf(ours, tmp_path / "llama"))), expected) < 1e-4


def test_mistral_without_sliding_window(tmp_path):
    hf_model, hf_dir = save_hf(tmp_path, "mistral", num_key_value_heads=2, sliding_window=None)
    assert max_diff(our_logits(from_hf(hf_dir, tmp_path / "ours")), hf_logits(hf_model)) < 1e-4


def test_sharded_checkpoint(tmp_path):
    hf_model, hf_dir = save_hf(tmp_path, num_key_value_heads=2)
    hf_model.save_pretrained(hf_dir, safe_serialization=True, max_shard_size="40KB")
    (hf_dir / "model.safetensors").unlink(missing_ok=True)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert max_diff(our_logits(from_hf(hf_dir, tmp_path / "ours")), hf_logits(hf_model)) < 1e-4
    (hf_dir / sorted(set(index["weight_map"].values()))[0]).unlink()
    with pytest.raises(LmforgeError, match="missing"):
        from_hf(hf_dir, tmp_path / "again")


def test_state_dict_round_trip_is_exact():
    for overrides in ({"qkv_bias": True}, {"bias": True, "n_kv_heads": 1}, {"tie_embeddings": True}):
        cfg = from_dict(ModelConfig, {"preset": "debug", "vocab_size": VOCAB, **overrides})
        state = {k: v for k, v in randomize(Transformer(cfg)).state_dict().items()
                 if not (cfg.tie_embeddings and k == "lm_head.weight")}
        back = state_dict_from_hf(state_dict_to_hf(state, cfg), cfg)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


# ----------------------------------------------------------------------------------------------
# CLI, dtypes, tokenizer files and token ids


def write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def test_cli_round_trip_bfloat16_and_tokenizer_files(tmp_path, capsys):
    hf_model, hf_dir = save_hf(tmp_path, num_key_value_heads=2, bos_token_id=5, eos_token_id=7)
    write_tokenizer(hf_dir)
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert run_cli(["convert", "from-hf", str(hf_dir), str(ours)], capsys)[0] == 0
    assert (ours / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert max_diff(our_logits(ours), hf_logits(hf_model)) < 1e-4
    assert run_cli(["convert", "to-hf", str(ours), str(back), "--dtype", "bfloat16"], capsys)[0] == 0
    config = json.loads((back / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["dtype"]) == (5, 7, "bfloat16")
    assert json.loads((back / "generation_config.json").read_text())["eos_token_id"] == 7
    assert (back / "tokenizer_config.json").is_file()
    weights = load_file(str(back / "model.safetensors"))
    q = hf_model.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], q.bfloat16())
    assert load_hf(back).dtype == torch.bfloat16


def test_token_ids_come_from_tokenizer_files_of_a_native_checkpoint(tmp_path):
    ours = save_ours(tmp_path)
    write_tokenizer(ours)
    config = json.loads((to_hf(ours, tmp_path / "hf") / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, None)


def test_cli_help_lists_positionals(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "from-hf", "--help"])
    assert exit_info.value.code == 0
    assert "HF_DIR" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_missing_directory(tmp_path, capsys):
    missing, out = str(tmp_path / "nope"), str(tmp_path / "o")
    assert_one_line_error(*run_cli(["convert", "from-hf", missing, out], capsys), missing)
    assert_one_line_error(*run_cli(["convert", "to-hf", missing, out], capsys), missing)


def test_pickle_only_checkpoint_is_refused(tmp_path, capsys):
    _, hf_dir = save_hf(tmp_path)
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"not opened")
    code, err = run_cli(["convert", "from-hf", str(hf_dir), str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "pickle", str(hf_dir))


def test_unsupported_rope_scaling_is_refused(tmp_path, capsys):
    _, hf_dir = save_hf(tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}
    (hf_dir / "config.json").write_text(json.dumps(config))
    assert_one_line_error(*run_cli(["convert", "from-hf", str(hf_dir), str(tmp_path / "o")], capsys),
                          "rope_scaling", "not supported yet", "config.json")
    v5_style = {**TINY, "model_type": "llama", "rope_parameters": {"rope_type": "longrope", "factor": 8.0}}
    with pytest.raises(LmforgeError, match="rope_parameters.*not supported yet"):
        model_config_from_hf(v5_style)


def test_exporting_a_layernorm_model_fails(tmp_path, capsys):
    ours = save_ours(tmp_path, norm="layernorm")
    code, err = run_cli(["convert", "to-hf", str(ours), str(tmp_path / "hf")], capsys)
    assert_one_line_error(code, err, "model.norm='layernorm'")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("field,value", [("norm_placement", "post"), ("mlp", "gelu"), ("mlp", "relu"),
                                         ("position", "learned"), ("position", "none")])
def test_configs_llama_cannot_express(field, value):
    cfg = from_dict(ModelConfig, {"preset": "debug", "vocab_size": VOCAB, field: value})
    with pytest.raises(LmforgeError, match=f"model.{field}"):
        hf_config_from_model(cfg)


@pytest.mark.parametrize("change,needle", [
    ({"model_type": "gpt2"}, "gpt2"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"vocab_size": None}, "vocab_size"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
     "sliding_window"),
])
def test_config_values_we_cannot_import(change, needle):
    with pytest.raises(LmforgeError, match=needle):
        model_config_from_hf({**TINY, "model_type": "llama", **change})


def test_weights_that_do_not_match_the_config(tmp_path, capsys):
    _, hf_dir = save_hf(tmp_path, num_key_value_heads=2)
    config_path, weights_path = hf_dir / "config.json", hf_dir / "model.safetensors"
    weights = load_file(str(weights_path))
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "intermediate_size": 96}))
    argv = ["convert", "from-hf", str(hf_dir), str(tmp_path / "o")]
    assert_one_line_error(*run_cli(argv, capsys), "gate_proj", "(128, 64)")
    config_path.write_text(json.dumps(config))
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"}, str(weights_path))
    assert_one_line_error(*run_cli(argv, capsys), "model.norm.weight")
    save_file({**weights, "model.layers.0.extra.weight": torch.zeros(2)}, str(weights_path))
    assert_one_line_error(*run_cli(argv, capsys), "model.layers.0.extra.weight")
    config_path.write_text('{"model_type": "llama",\n  oops}')
    assert_one_line_error(*run_cli(argv, capsys), "config.json", "line 2")


def test_lmforge_checkpoint_that_does_not_match_its_config(tmp_path, capsys):
    ours = save_ours(tmp_path)
    config = json.loads((ours / "config.json").read_text())
    config["model"]["d_ff"] = 96
    (ours / "config.json").write_text(json.dumps(config))
    assert_one_line_error(*run_cli(["convert", "to-hf", str(ours), str(tmp_path / "hf")], capsys),
                          "blocks.0.mlp.up.weight")
    code, err = run_cli(["convert", "to-hf", str(ours), str(tmp_path / "hf"), "--dtype", "int8"], capsys)
    assert_one_line_error(code, err, "dtype")
