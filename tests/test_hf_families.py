"""HF parity for LLaMA, GPT-2, T5 (v1.1 gated-GeLU and original ReLU), Qwen2 and Mistral (sliding window): tiny random
transformers models -> `from_hf` -> equal fp32 logits and equal greedy tokens for 16 steps; `to_hf` back ->
transformers loads it with equal logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from lmforge import cli  # noqa: E402
from lmforge.core.config import from_dict  # noqa: E402
from lmforge.core.errors import LmforgeError  # noqa: E402
from lmforge.generate.engine import generate  # noqa: E402
from lmforge.generate.sampling import SamplingParams  # noqa: E402
from lmforge.model import ModelConfig, save_model  # noqa: E402
from lmforge.model.encdec import EncoderDecoder  # noqa: E402
from lmforge.model.hf.convert import from_hf, to_hf  # noqa: E402
from lmforge.model.hf.registry import hf_config_from_model, model_config_from_hf  # noqa: E402
from lmforge.model.io import load_model  # noqa: E402

VOCAB, STEPS = 96, 16
DECODERS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)),
    # a window of 5 over 8 + 16 tokens: every later query loses keys, so a missing window would show
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, sliding_window=5)),
}
T5S = {"t5-v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
       "t5-original": dict(feed_forward_proj="relu")}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (biases, norm gains, relative-bias tables), so no mis-mapped tensor can hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def ids(n: int = 8, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def hf_model_dir(tmp_path: Path, name: str):
    if name in DECODERS:
        config_cls, model_cls, kw = DECODERS[name]
        model = model_cls(config_cls(vocab_size=VOCAB, **kw, attn_implementation="eager"))
    else:
        config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=3,
                                       num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                       relative_attention_max_distance=20, dropout_rate=0.0, **T5S[name])
        model = transformers.T5ForConditionalGeneration(config)
    model = randomize(model)
    directory = tmp_path / f"hf-{name}"
    model.save_pretrained(directory)
    if name == "t5-v1.1":  # transformers 5 saves every T5 tied; a real v1.1 checkpoint stores its own head
        weights = load_file(str(directory / "model.safetensors"))
        save_file({**weights, "lm_head.weight": torch.randn(VOCAB, 32) * 0.2}, str(directory / "model.safetensors"))
        model = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
        assert model.lm_head.weight is not model.shared.weight
    model.generation_config.eos_token_id = None  # decode all 16 steps on both sides
    return model, directory


@torch.no_grad()
def our_greedy(model, prompt: torch.Tensor) -> torch.Tensor:
    """Prefill + one token per step through the KV cache (the path generation takes)."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + STEPS)
    logits, out = model(prompt, cache=cache)[:, -1:], []
    for step in range(STEPS):
        out.append(logits.argmax(-1))
        logits = model(out[-1], cache=cache, start_pos=prompt.shape[1] + step)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_families_match_transformers(tmp_path, name):
    hf_model, hf_dir = hf_model_dir(tmp_path, name)
    ours = load_model(from_hf(hf_dir, tmp_path / "ours"))
    prompt = ids()
    long = ids(24, seed=2)
    with torch.no_grad():
        assert max_diff(ours(long), hf_model(long).logits) <= 1e-4
        expected = hf_model.generate(prompt, max_new_tokens=STEPS, do_sample=False)[:, prompt.shape[1]:]
    assert torch.equal(our_greedy(ours, prompt), expected)
    back = transformers.AutoModelForCausalLM.from_pretrained(to_hf(tmp_path / "ours", tmp_path / "back"),
                                                             attn_implementation="eager").eval()
    assert type(back) is type(hf_model)
    with torch.no_grad():
        assert max_diff(back(long).logits, hf_model(long).logits) <= 1e-4


def test_gpt2_config_and_conv1d_transpose(tmp_path):
    _, hf_dir = hf_model_dir(tmp_path, "gpt2")
    cfg = load_model(from_hf(hf_dir, tmp_path / "ours")).cfg
    assert (cfg.position, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_embeddings) == ("learned", "layernorm", "gelu",
                                                                                True, True)


def test_mistral_window_is_imported(tmp_path):
    _, hf_dir = hf_model_dir(tmp_path, "mistral")
    assert load_model(from_hf(hf_dir, tmp_path / "ours")).cfg.sliding_window == 5


@pytest.mark.parametrize("name", T5S)
def test_t5_matches_transformers(tmp_path, name):
    hf_model, hf_dir = hf_model_dir(tmp_path, name)
    ours = load_model(from_hf(hf_dir, tmp_path / "ours"))
    assert isinstance(ours, EncoderDecoder)
    assert ours.cfg.tie_embeddings == (name == "t5-original")
    assert ours.cfg.output_scale == (32 ** -0.5 if name == "t5-original" else 1.0)
    src, tgt = ids(12), ids(7, seed=3)
    mask = torch.ones_like(src)
    mask[1, 9:] = 0  # a padded source row
    with torch.no_grad():
        expected = hf_model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        assert max_diff(ours(src, tgt, mask), expected) <= 1e-4
        hf_tokens = hf_model.generate(src, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                                     decoder_start_token_id=0)[:, 1:]
    greedy = SamplingParams(greedy=True, max_new_tokens=STEPS)  # the engine pads the sources itself
    assert generate(ours, [src[0].tolist(), src[1, :9].tolist()], greedy) == hf_tokens.tolist()
    back = transformers.T5ForConditionalGeneration.from_pretrained(to_hf(tmp_path / "ours", tmp_path / "back"))
    with torch.no_grad():
        assert max_diff(back.eval()(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits,
                        expected) <= 1e-4


def test_lmforge_t5_exports(tmp_path):
    cfg = from_dict(ModelConfig, {"preset": "t5-tiny", "vocab_size": VOCAB, "d_model": 32, "n_heads": 4,
                                  "n_layers": 2, "d_ff": 48})
    model = randomize(EncoderDecoder(cfg))
    save_model(model, tmp_path / "ours")
    back = transformers.T5ForConditionalGeneration.from_pretrained(to_hf(tmp_path / "ours", tmp_path / "hf")).eval()
    src, tgt = ids(10), ids(6, seed=4)
    with torch.no_grad():
        assert max_diff(back(input_ids=src, decoder_input_ids=tgt).logits, model(src, tgt)) <= 1e-4


def test_cli_round_trip_names_the_class(tmp_path, capsys):
    _, hf_dir = hf_model_dir(tmp_path, "gpt2")
    assert cli.main(["convert", "from-hf", str(hf_dir), str(tmp_path / "o")]) == 0
    assert cli.main(["convert", "to-hf", str(tmp_path / "o"), str(tmp_path / "h")]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out


@pytest.mark.parametrize("family,field", [("gpt2", "model.norm"), ("t5", "model.arch"), ("qwen2", "model.qkv_bias"),
                                          ("mistral", "model.qkv_bias")])
def test_configs_a_family_cannot_express(family, field):
    cfg = from_dict(ModelConfig, {"preset": "debug", "vocab_size": VOCAB, "qkv_bias": family == "mistral"})
    with pytest.raises(LmforgeError, match=field):
        hf_config_from_model(cfg, family=family)


def test_every_preset_has_a_model_card_line():
    from lmforge.model.presets import CARDS, PRESETS

    assert sorted(PRESETS) == sorted(CARDS)
    for name in ("gpt2", "qwen2-0.5b", "mistral-7b", "t5-small", "t5-v1.1-base"):
        ModelConfig(**PRESETS[name])  # valid configs
        assert "/" in CARDS[name]  # names a hub checkpoint


def test_qwen2_windows_only_when_every_layer_slides():
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, model_type="qwen2", use_sliding_window=True, sliding_window=16)
    assert model_config_from_hf({**base, "max_window_layers": 0}).sliding_window == 16
    assert model_config_from_hf({**base, "use_sliding_window": False}).sliding_window == 0
    with pytest.raises(LmforgeError, match="max_window_layers"):
        model_config_from_hf({**base, "max_window_layers": 1})
