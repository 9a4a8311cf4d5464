"""The static-shape decode step (lmforge.generate.static) gives the normal engine's tokens; compile on CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.generate.decode import decode_static
from lmforge.generate.engine import Strategy, generate
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.static import WINDOW_STEP, StaticDecoder, static_decoder, static_supported
from lmforge.model import ModelConfig, Transformer, save_model

PROMPT = [5, 17, 3, 42, 8]


def tiny_model(**overrides) -> Transformer:
    # A wider init than the default makes logits peaked, so argmax never hinges on float noise.
    cfg = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, vocab_size=64, max_seq_len=48,
               init_std=0.3)
    torch.manual_seed(0)
    return Transformer(from_dict(ModelConfig, {**cfg, **overrides})).eval()


@pytest.mark.parametrize("overrides", [
    {"n_kv_heads": 2},                                   # RoPE + grouped-query attention
    {"position": "learned", "mlp": "gelu", "norm": "layernorm", "tie_embeddings": True},  # GPT-2 style
    {"position": "sinusoidal", "n_kv_heads": 1},         # multi-query
])
def test_static_step_matches_engine(overrides: dict) -> None:
    model = tiny_model(**overrides)
    for prompt, n in ((PROMPT, 40), ([9], 47)):  # 47 new tokens after 1 fill the context exactly
        params = SamplingParams(greedy=True, max_new_tokens=n)
        expected = generate(model, prompt, params)
        assert len(expected) == n
        assert list(decode_static(model, prompt, params, compile=False)) == expected


@torch.no_grad()
def test_static_logits_match_cached_forward() -> None:
    """Step by step, the whole-cache masked step equals the sliced-cache forward (not only the argmax)."""
    model = tiny_model(n_kv_heads=2)
    dec = StaticDecoder(model)
    cache = model.new_cache(1)
    ids = torch.tensor([PROMPT + [1, 2, 3]])
    torch.testing.assert_close(dec.prefill(ids[:, :5]), model(ids[:, :5], cache=cache)[:, -1])
    for pos in range(5, ids.shape[1]):
        ours = dec(ids[:, pos:pos + 1], torch.tensor([pos]))
        ref = model(ids[:, pos:pos + 1], cache=cache, start_pos=pos)[:, -1]
        torch.testing.assert_close(ours, ref)


@torch.no_grad()
def test_windowed_step_matches_cached_forward() -> None:
    """A CPU step attends over the slots written so far (rounded up to WINDOW_STEP), not the whole cache."""
    model = tiny_model(n_kv_heads=2, max_seq_len=80)
    dec = StaticDecoder(model)
    cache = model.new_cache(1)
    ids = torch.randint(0, 64, (1, 70), generator=torch.Generator().manual_seed(0))
    dec.prefill(ids[:, :5])
    model(ids[:, :5], cache=cache)
    for pos in range(5, ids.shape[1]):
        window = dec.window_for(pos)
        assert len(window) == min(80, (pos // WINDOW_STEP + 1) * WINDOW_STEP) and pos < len(window)
        ours = dec(ids[:, pos:pos + 1], torch.tensor([pos]), window)
        torch.testing.assert_close(ours, model(ids[:, pos:pos + 1], cache=cache, start_pos=pos)[:, -1])


def test_sampling_and_stop_tokens_match_engine() -> None:
    model = tiny_model()
    params = SamplingParams(temperature=0.8, top_k=10, seed=3, max_new_tokens=30, repetition_penalty=1.3)
    expected = generate(model, PROMPT, params)
    assert list(decode_static(model, PROMPT, params, compile=False)) == expected
    stop = SamplingParams(greedy=True, max_new_tokens=30, stop_token_ids=[expected[3]])
    assert list(decode_static(model, PROMPT, stop, compile=False)) == generate(model, PROMPT, stop)


def test_unsupported_models_fall_back(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model(position="alibi")
    assert "alibi" in static_supported(model)
    with pytest.raises(ValueError, match="alibi"):
        StaticDecoder(model)
    params = SamplingParams(greedy=True, max_new_tokens=5)
    with caplog.at_level("WARNING"):
        assert generate(model, PROMPT, Strategy(sampling=params, compile=True)) == generate(model, PROMPT, params)
    assert "decoding eagerly" in caplog.text


def test_decoder_is_cached_outside_the_state_dict() -> None:
    model = tiny_model()
    keys = set(model.state_dict())
    assert static_decoder(model, compile=False) is static_decoder(model, compile=False)
    assert set(model.state_dict()) == keys


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_compiled_cuda_graphs_match_engine() -> None:
    model = tiny_model(n_kv_heads=2).cuda()
    params = SamplingParams(greedy=True, max_new_tokens=40)
    expected = generate(model, PROMPT, params)
    assert generate(model, PROMPT, Strategy(sampling=params, compile=True)) == expected
    assert generate(model, PROMPT, Strategy(sampling=params, compile=True)) == expected  # replays the recorded graph
    short = generate(model, [9, 1], params)
    # another prompt length, same graph
    assert generate(model, [9, 1], Strategy(sampling=params, compile=True)) == short


@pytest.mark.slow  # inductor compiles the step for the CPU (a minute or more on a busy machine)
def test_compiled_on_cpu_matches_eager() -> None:
    model = tiny_model(n_kv_heads=2)
    params = SamplingParams(greedy=True, max_new_tokens=40)
    expected = generate(model, PROMPT, params)
    dec = static_decoder(model, compile=True)
    assert dec.step is not dec.forward  # compiled, not the eager step
    assert generate(model, PROMPT, Strategy(sampling=params, compile=True)) == expected
    assert generate(model, [9, 1], Strategy(sampling=params, compile=True)) == generate(model, [9, 1], params)


@pytest.mark.slow  # compiles the step with inductor on CPU (a minute or more)
def test_cli_compile_flag_same_tokens(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = save_model(tiny_model(n_kv_heads=2), tmp_path / "model")
    outs = []
    for extra in ([], ["--compile"]):
        assert main(["generate", "--checkpoint", str(checkpoint), "--input-ids", "5 17 3 42 8", "--sampling.greedy",
                     "--json", "--sampling.max-new-tokens", "20", *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0] == outs[1] and len(outs[0]["ids"]) == 20


def test_interleaved_streams_do_not_share_the_cache() -> None:
    model = tiny_model()
    params = SamplingParams(greedy=True, max_new_tokens=20)
    a = decode_static(model, PROMPT, params, compile=False)
    b = decode_static(model, [9, 1], params, compile=False)
    first = [next(a)]
    both = list(b)
    assert first + list(a) == generate(model, PROMPT, params)
    assert both == generate(model, [9, 1], params)


@pytest.mark.slow  # compiles the step with inductor on CPU
def test_compiled_step_writes_the_cache_in_place() -> None:
    """The compiled step writes one slot of each layer's cache; it never copies a whole layer's cache (which a write
    into a view of one [layers, ...] cache tensor compiles to: a full copy of the cache every token)."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_model(n_kv_heads=2)
    dec = StaticDecoder(model, compile=True)
    dec.prefill(torch.tensor([PROMPT]))
    _, code = run_and_get_code(dec.step, torch.tensor([[7]]), torch.tensor([len(PROMPT)]))
    layer_cache = 2 * model.cfg.max_seq_len * model.cfg.head_dim  # elements of one layer's keys (2 kv heads)
    assert f"static_cast<int64_t>({layer_cache}L)" not in "\n".join(code)
    ref = StaticDecoder(model)
    ref.prefill(torch.tensor([PROMPT]))
    ref(torch.tensor([[7]]), torch.tensor([len(PROMPT)]))
    for i in range(model.cfg.n_layers):
        torch.testing.assert_close(dec.cache.k[i], ref.cache.k[i])
        torch.testing.assert_close(dec.cache.v[i], ref.cache.v[i])
