"""Layer zoo: DeepNorm, sandwich norm, GeGLU, ALiBi, T5 relative bias, sliding windows (with the KV cache),
each against hand-computed values or the uncached forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tinymodels import debug_model

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.attention import attention_mask
from lmforge.model.layers import MLP, deepnorm_constants
from lmforge.model.positions import alibi_bias, alibi_slopes, relative_position_bucket

VOCAB = 64


def cfg(**overrides) -> ModelConfig:
    return from_dict(ModelConfig, {"preset": "debug", "vocab_size": VOCAB, "max_seq_len": 48, **overrides})


def model(**overrides) -> Transformer:
    return debug_model(VOCAB, 0, max_seq_len=48, **overrides)


def ids(T: int = 20, B: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def cached_logits(m: Transformer, x: torch.Tensor, first: int = 5) -> torch.Tensor:
    """Prefill `first` tokens, then feed one token per step through the KV cache."""
    cache = m.new_cache(x.shape[0], x.shape[1])
    out = [m(x[:, :first], cache=cache)]
    out += [m(x[:, t:t + 1], cache=cache, start_pos=t) for t in range(first, x.shape[1])]
    return torch.cat(out, dim=1)


def test_deepnorm_constants_and_block_math():
    c = cfg(norm_placement="deepnorm", n_layers=8)
    alpha, beta = deepnorm_constants(c)
    assert alpha == pytest.approx(2.0) and beta == pytest.approx(64 ** -0.25)  # (2N)^1/4, (8N)^-1/4, N=8
    enc = deepnorm_constants(cfg(norm_placement="deepnorm", n_layers=6, n_encoder_layers=6), "encoder")
    assert enc == pytest.approx((0.81 * (6 ** 5) ** (1 / 16), 0.87 * (6 ** 5) ** (-1 / 16)))
    m = model(norm_placement="deepnorm", n_layers=8)
    block = m.blocks[0]
    x = torch.randn(1, 4, 64)
    with torch.no_grad():  # N(alpha x + f(x)) twice, by hand
        h = block.attn_norm(2.0 * x + block.attn(x))
        expected = block.mlp_norm(2.0 * h + block.mlp(h))
        assert torch.allclose(block(x, None, None, 0, None), expected, atol=1e-6)
    # init (sec. 3): Xavier normal, std = gain * sqrt(2 / (fan_in + fan_out)), gain beta on the value rows, the
    # output projection and the MLP (its fused gate+up is one 256 x 64 matrix), gain 1 on the q and k rows.
    # Pooled over 8 blocks a sample std lands within ~1% of the formula; a wrong gain or fan misses by >= 30%.
    beta = 64 ** -0.25

    def xavier(gain: float, fan_in: int, fan_out: int) -> float:
        return gain * math.sqrt(2 / (fan_in + fan_out))

    parts = {"q, k": (lambda b: b.attn.qkv.weight[:96], xavier(1.0, 64, 128)),  # 4 q + 2 k heads of 16 rows
             "v": (lambda b: b.attn.qkv.weight[96:], xavier(beta, 64, 32)),  # re-drawn as its own matrix
             "out": (lambda b: b.attn.out.weight, xavier(beta, 64, 64)),
             "gate+up": (lambda b: b.mlp.up.weight, xavier(beta, 64, 256)),
             "down": (lambda b: b.mlp.down.weight, xavier(beta, 128, 64))}
    for name, (part, std) in parts.items():
        sample = torch.cat([part(b).detach().flatten() for b in m.blocks])
        assert sample.std().item() == pytest.approx(std, rel=0.03), name
        assert abs(sample.mean().item()) < 5 * std / math.sqrt(sample.numel()), name


def test_sandwich_norm_adds_post_norms_and_a_final_norm():
    m = model(norm_placement="sandwich")
    block = m.blocks[0]
    assert block.attn_post_norm is not None and block.mlp_post_norm is not None
    assert not isinstance(m.norm, torch.nn.Identity)
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        h = x + block.attn_post_norm(block.attn(block.attn_norm(x)))
        expected = h + block.mlp_post_norm(block.mlp(block.mlp_norm(h)))
        assert torch.allclose(block(x, None, None, 0, None), expected, atol=1e-6)


def test_geglu_by_hand():
    mlp = MLP(cfg(mlp="geglu", d_ff=16))
    x = torch.randn(2, 3, 64)
    gate, up = (x @ mlp.up.weight.T).chunk(2, dim=-1)
    expected = (F.gelu(gate, approximate="tanh") * up) @ mlp.down.weight.T
    assert torch.allclose(mlp(x), expected, atol=1e-6)
    assert cfg(mlp="geglu", d_ff=0).d_ff == 192  # gated default: 8/3 d rounded up to 64


def test_alibi_slopes_and_bias_by_hand():
    assert alibi_slopes(8).tolist() == [2.0 ** -k for k in range(1, 9)]
    # 6 heads: the 4-head slopes, then every other slope of the 8-head sequence
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    bias = alibi_bias(torch.tensor([0.5]), torch.tensor([2]), torch.arange(3))
    assert bias.tolist() == [[[[-1.0, -0.5, 0.0]]]]


def test_t5_buckets_by_hand_and_against_transformers():
    rel = torch.tensor([0, -1, 1, -7, -8, -100, -200, 3])
    bi = relative_position_bucket(rel, True, 32, 128)
    # 16 buckets a side, 8 exact; -100 -> 8 + int(ln(100/8) / ln(128/8) * 8) = 15; positives offset by 16
    assert bi.tolist() == [0, 1, 17, 7, 8, 15, 15, 19]
    causal = relative_position_bucket(rel, False, 32, 128)
    # causal: 32 one-sided buckets, 16 exact; -100 -> 16 + int(ln(100/16) / ln(128/16) * 16) = 30
    assert causal.tolist() == [0, 1, 0, 7, 8, 16 + int(math.log(100 / 16) / math.log(128 / 16) * 16), 31, 0]
    assert causal[5] == 30
    t5 = pytest.importorskip("transformers").models.t5.modeling_t5.T5Attention
    grid = torch.arange(-300, 300)
    for bidirectional in (True, False):
        for buckets, dist in ((32, 128), (8, 20)):
            ours = relative_position_bucket(grid, bidirectional, buckets, dist)
            assert torch.equal(ours, t5._relative_position_bucket(grid, bidirectional, buckets, dist))


def test_sliding_window_mask_by_hand():
    m = attention_mask(4, 4, 0, torch.device("cpu"), window=2)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    # one query at slot 5 over 6 cached slots, window 3: keys 3, 4, 5
    assert attention_mask(1, 6, 5, torch.device("cpu"), window=3)[0, 0].int().tolist() == [[0, 0, 0, 1, 1, 1]]


@pytest.mark.parametrize("overrides", [
    dict(sliding_window=4), dict(position="alibi"), dict(position="t5", rel_buckets=8, rel_max_distance=16),
    dict(position="alibi", sliding_window=6), dict(norm_placement="sandwich", mlp="geglu"),
    dict(norm_placement="deepnorm"),
])
def test_kv_cache_decoding_matches_the_full_forward(overrides):
    m = model(**overrides)
    x = ids()
    with torch.no_grad():
        full = m(x)
    assert torch.allclose(cached_logits(m, x), full, atol=1e-5)


def test_window_changes_what_far_tokens_see():
    windowed, full = model(sliding_window=4), model()
    windowed.load_state_dict(full.state_dict())
    x = ids()
    y = x.clone()
    y[:, 0] = (y[:, 0] + 1) % VOCAB  # token 0 leaves the window of queries 4+ (in layer 1; 2 layers -> 7+)
    with torch.no_grad():
        assert torch.allclose(windowed(x)[:, 8:], windowed(y)[:, 8:], atol=1e-6)
        assert not torch.allclose(full(x)[:, 8:], full(y)[:, 8:], atol=1e-4)


@pytest.mark.parametrize("field,value,needle", [("sliding_window", -1, "sliding_window"),
                                                ("rel_buckets", 2, "rel_buckets"),
                                                ("output_scale", 0.0, "output_scale"),
                                                ("norm_placement", "middle", "norm_placement")])
def test_bad_zoo_values_name_the_field(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        cfg(position="t5", **{field: value})


def test_window_is_symmetric_for_bidirectional_rows():
    m = attention_mask(4, 4, 0, torch.device("cpu"), causal=False, window=2)[0, 0].int().tolist()
    assert m == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
