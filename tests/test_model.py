from __future__ import annotations

import math

import pytest
import torch
from tinymodels import debug_model

from lmforge.core.config import from_dict
from lmforge.model import ModelConfig, Transformer
from lmforge.model.size import num_params

VARIANTS = {
    "llama-gqa": {},
    "mha-tied": dict(n_kv_heads=4, tie_embeddings=True),
    "mqa": dict(n_kv_heads=1),
    "gpt2-like": dict(norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True),
    "post-norm-sinusoidal-relu": dict(norm_placement="post", position="sinusoidal", mlp="relu"),
    "qkv-bias-no-pos": dict(qkv_bias=True, position="none"),
}


def closed_form_params(n_kv_heads: int = 2, gated: bool = True, bias: bool = False, qkv_bias: bool = False,
                       layernorm: bool = False, tied: bool = False, learned_pos: bool = False,
                       final_norm: bool = True) -> int:
    """The debug preset's parameter count written out by hand (vocab 97, d 64, 2 layers, 4 query heads of 16,
    d_ff 128, context 128), independent of the modules the model builds."""
    V, d, L, H, hd, ff, T = 97, 64, 2, 4, 16, 128, 128
    qkv_rows = (H + 2 * n_kv_heads) * hd
    attn = d * qkv_rows + H * hd * d + (bias or qkv_bias) * qkv_rows + bias * d
    mlp = (3 if gated else 2) * d * ff + bias * ((2 if gated else 1) * ff + d)  # gated: gate and up, then down
    norm = d * (2 if layernorm else 1)  # LayerNorm has a bias beside its gain
    return V * d * (1 if tied else 2) + learned_pos * T * d + L * (attn + mlp + 2 * norm) + final_norm * norm


PARAMS = {
    "llama-gqa": closed_form_params(),
    "mha-tied": closed_form_params(n_kv_heads=4, tied=True),
    "mqa": closed_form_params(n_kv_heads=1),
    "gpt2-like": closed_form_params(gated=False, bias=True, layernorm=True, tied=True, learned_pos=True),
    "post-norm-sinusoidal-relu": closed_form_params(gated=False, final_norm=False),
    "qkv-bias-no-pos": closed_form_params(qkv_bias=True),
}


def build(**overrides) -> Transformer:
    return debug_model(97, 0, **overrides)


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_forward_and_count_parameters(name):
    model = build(**VARIANTS[name])
    ids = torch.randint(0, 97, (2, 12))
    logits = model(ids)
    assert logits.shape == (2, 12, 97) and torch.isfinite(logits).all()
    assert model.num_params() == num_params(model.cfg) == PARAMS[name]


@pytest.mark.parametrize("name", VARIANTS)
def test_causality_future_tokens_do_not_change_the_past(name):
    model = build(**VARIANTS[name])
    ids = torch.randint(0, 97, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 97
    torch.testing.assert_close(model(ids)[:, :6], model(changed)[:, :6])


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_prefill_then_decode_equals_full_forward(name):
    model = build(**VARIANTS[name])
    ids = torch.randint(0, 97, (2, 11))
    full = model(ids)
    cache = model.new_cache(2, 16)
    parts = [model(ids[:, :5], cache=cache, start_pos=0), model(ids[:, 5:8], cache=cache, start_pos=5)]
    parts += [model(ids[:, t:t + 1], cache=cache, start_pos=t) for t in range(8, 11)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def naive_attention_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Reference forward with explicit softmax(QK^T/sqrt(d) + mask)V and repeated KV heads."""
    cfg = model.cfg
    x = model.embed(ids)
    T = ids.shape[1]
    cos, sin = model.rope(torch.arange(T))
    from lmforge.model.positions import apply_rope

    for block in model.blocks:
        h = block.attn_norm(x)
        H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, v = block.attn.qkv(h).split([H * D, KV * D, KV * D], dim=-1)
        q = apply_rope(q.view(1, T, H, D).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(1, T, KV, D).transpose(1, 2), cos, sin).repeat_interleave(H // KV, dim=1)
        v = v.view(1, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, T, H * D)
        x = x + block.attn.out(y)
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.norm(x))


def test_sdpa_gqa_matches_a_naive_reference():
    model = build()
    ids = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(model(ids), naive_attention_logits(model, ids), atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_storage_and_presets_have_published_sizes():
    model = build(tie_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    assert abs(num_params(from_dict(ModelConfig, {"preset": "llama2-7b"})) - 6.74e9) < 0.01e9
    assert abs(num_params(from_dict(ModelConfig, {"preset": "llama3-8b"})) - 8.03e9) < 0.01e9
    llama31 = from_dict(ModelConfig, {"preset": "llama3.1-8b"})
    assert num_params(llama31) == num_params(from_dict(ModelConfig, {"preset": "llama3-8b"}))
    assert (llama31.rope_scaling, llama31.rope_factor, llama31.max_seq_len) == ("llama3", 8.0, 131072)


def test_sequence_longer_than_max_seq_len_is_refused():
    model = build(max_seq_len=8)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


LOAD_PEAK_CHILD = """
import sys
from lmforge.model.io import load_model
def kib(field):
    return int(next(line for line in open('/proc/self/status') if line.startswith(field)).split()[1])
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset VmHWM (the peak RSS) to the current RSS
before = kib('VmRSS:')
load_model(sys.argv[1])
print(kib('VmHWM:') - before)
"""


def test_load_model_never_holds_a_second_copy_of_the_weights(tmp_path):
    """Found benchmarking LoRA SFT of the qwen2-0.5b shape: loading built the model, then read the whole file
    beside it, so the load peaked at twice the weights. Now each tensor is copied in as it is read."""
    import os
    import subprocess
    import sys

    from lmforge.model import save_model

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    torch.manual_seed(0)  # 8 blocks of 512 wide: ~100 MB of fp32 weights, no tensor over 3 MB
    model = Transformer(ModelConfig(vocab_size=256, d_model=512, n_layers=8, n_heads=8, max_seq_len=64))
    weights_kib = sum(p.numel() * 4 for p in model.parameters()) / 1024
    save_model(model, tmp_path / "m")
    del model
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK_CHILD, str(tmp_path / "m")], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    grew = int(out.stdout.strip().splitlines()[-1])
    assert grew < 1.4 * weights_kib, (grew, weights_kib)  # was ~2x: the built model plus the whole file
