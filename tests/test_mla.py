import pytest
import torch

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.generate.batch import generate_batch
from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.model.mla import MLA, LatentCache, mla_cache_bytes_per_token
from lmforge.model.size import num_params


def mla_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, attention="mla",
                kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12)
    return Transformer(ModelConfig(**{**base, **overrides})).eval()


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_latent_cache_decode_matches_full_forward(q_lora_rank):
    """Prefill a chunk, then one token at a time (absorbed-weight path) == one full causal forward."""
    model = mla_model(q_lora_rank=q_lora_rank)
    assert isinstance(model.blocks[0].attn, MLA)
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 12)
        assert isinstance(cache, LatentCache)
        steps = [model(x[:, :5], cache=cache)]
        steps += [model(x[:, t:t + 1], cache=cache, start_pos=t) for t in range(5, 8)]
        steps.append(model(x[:, 8:], cache=cache, start_pos=8))  # a multi-token chunk after the cache
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_holds_only_latent_and_rope_key():
    model = mla_model()
    cache = model.new_cache(3, 10)
    assert cache.latent.shape == (2, 3, 10, 16) and cache.rope_key.shape == (2, 3, 10, 8)
    assert cache.bytes_per_token() == 2 * (16 + 8) * 4
    with pytest.raises(ValueError, match="holds 10 positions"):
        cache.update(0, torch.zeros(3, 11, 16), torch.zeros(3, 11, 8), 0)


def test_kv_bytes_per_token_smaller_than_gqa_for_the_presets():
    mla = from_dict(ModelConfig, {"preset": "mla-tiny", "vocab_size": 256}, "model.")
    gqa = from_dict(ModelConfig, {"preset": "tiny", "vocab_size": 256}, "model.")
    # per layer: latent 64 + rope key 16 = 80 numbers against 2 * 4 kv heads * 32 = 256
    assert mla_cache_bytes_per_token(mla, torch.float32) == 6 * 80 * 4
    assert mla_cache_bytes_per_token(gqa, torch.float32) == 6 * 256 * 4
    live = Transformer(mla).new_cache(1, 4).bytes_per_token()
    assert live == mla_cache_bytes_per_token(mla, torch.float32)
    assert Transformer(gqa).new_cache(1, 4).bytes_per_token() == KVCache(gqa, 1, 4).bytes_per_token() == 6 * 256 * 4
    # DeepSeek-V3: 576 numbers per layer, against 2 * 8 * 128 = 2048 for a GQA model of its width with 8 KV heads
    v3 = from_dict(ModelConfig, {"preset": "deepseek-v3"}, "model.")
    v3_gqa = ModelConfig(d_model=7168, n_layers=61, n_heads=128, n_kv_heads=8, head_dim=128)
    assert mla_cache_bytes_per_token(v3) == 61 * 576 * 2
    assert mla_cache_bytes_per_token(v3) < mla_cache_bytes_per_token(v3_gqa) / 3
    # same-sized presets: attention parameters within 15%
    assert abs(num_params(mla) - num_params(gqa)) / num_params(gqa) < 0.15


def test_engine_and_left_padded_batches_decode_mla():
    model = mla_model(q_lora_rank=12)
    params = SamplingParams(greedy=True, max_new_tokens=6)
    prompts = [[5, 9, 2, 7, 1], [3, 4]]
    single = [generate(model, p, params) for p in prompts]
    assert generate_batch(model, prompts, params) == single
    with torch.no_grad():  # greedy ids == argmax over full forwards
        ids = list(prompts[0])
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert single[0] == ids[5:]


def test_training_step_has_gradients_everywhere():
    model = mla_model(q_lora_rank=12).train()
    x = torch.randint(0, 64, (2, 10))
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_config_errors_are_one_line():
    for bad, field in ((dict(kv_lora_rank=0), "kv_lora_rank"), (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
                       (dict(position="learned"), "attention='mla'")):
        with pytest.raises(ConfigError) as e:
            from_dict(ModelConfig, {"d_model": 32, "n_heads": 4, "attention": "mla", "kv_lora_rank": 16,
                                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, **bad}, "model.")
        assert field in str(e.value) and "\n" not in str(e.value)


def test_prefix_tuning_is_refused_in_one_line():
    from lmforge.core.errors import LmforgeError

    model = mla_model()
    prefix = (torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8))
    with pytest.raises(LmforgeError, match="prefix tuning is not supported with model.attention='mla'"):
        model.blocks[0].attn(torch.zeros(1, 3, 32), prefix=prefix)
