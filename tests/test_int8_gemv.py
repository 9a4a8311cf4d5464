"""lmforge's int8 CPU kernel (`lmforge.model.int8_gemv`) and its layer (`quant.Int8Linear`): the product equals
the dequantized-weight reference up to float rounding, the whole model's logits too, greedy decoding is the same
compiled and eager, and a missing compiler falls back to plain torch. Speed is the benchmark's business."""

from __future__ import annotations

import shutil

import pytest
import torch
from tinymodels import debug_model, random_ids

from lmforge.core.errors import LmforgeError
from lmforge.generate.engine import Strategy, generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import int8_gemv
from lmforge.model.int8_gemv import int8_linear, quantize_int8, reference_linear
from lmforge.model.quant import Int8Linear, apply_quantize, bytes_per_token, quantize_weights

needs_cc = pytest.mark.skipif(int8_gemv._compiler() is None, reason="no C compiler to build the kernel")


def rounding_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """How far the kernel may be from the dequantized-weight product: each activation is rounded to int16 with its
    row's scale (max |x| / 32767), an error of at most half a step times sum |w_i| (w dequantized), plus a few
    ulps of sum |x_i| |w_i| for the float32 additions."""
    w = q.float().abs() * scale[:, None]
    step = x.abs().float().amax(dim=-1, keepdim=True) / 32767
    return step / 2 * w.sum(dim=1) + 1e-5 * (x.abs().float() @ w.T) + 1e-6


@needs_cc
@pytest.mark.parametrize(("out", "inp", "rows"), [(64, 128, 1), (33, 100, 1), (8, 7, 3), (96, 512, 32), (40, 64, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_dequantized_reference(out: int, inp: int, rows: int, bias: bool) -> None:
    assert int8_gemv.kernel() is not None  # built: the comparison below runs the C kernel, not the fallback
    torch.manual_seed(0)
    q, scale = quantize_int8(torch.randn(out, inp))
    b = torch.randn(out) if bias else None
    x = torch.randn(rows, 1, inp)  # tails past the 32-wide vector loop; rows > GEMV_MAX_ROWS take the matmul
    got, ref = int8_linear(x, q, scale, b), reference_linear(x, q, scale, b)
    assert got.shape == (rows, 1, out)
    assert ((got - ref).abs() <= rounding_bound(x, q, scale)).all()


@needs_cc
def test_kernel_runs_in_bf16_and_on_more_threads() -> None:
    torch.manual_seed(0)
    q, scale = quantize_int8(torch.randn(256, 192))
    x = torch.randn(1, 192)
    ref = reference_linear(x, q, scale)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ((int8_linear(x, q, scale) - ref).abs() <= rounding_bound(x, q, scale)).all()
    finally:
        torch.set_num_threads(threads)
    got = int8_linear(x.bfloat16(), q, scale)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference_linear(x.bfloat16(), q, scale).float(), rtol=0.02, atol=0.05)


def test_quantize_int8_round_trips_within_half_a_step() -> None:
    w = torch.randn(16, 40)
    w[3] = 0  # an all-zero row keeps a positive scale
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and (scale > 0).all()
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@needs_cc
def test_model_logits_equal_the_dequantized_model() -> None:
    """The int8 model's logits equal an fp32 model holding the dequantized weights, up to the activations' int16
    rounding (2^-16 of a row's max) and float rounding: the kernel adds no error of note beyond the int8 weights."""
    model = debug_model()
    quantize_weights(model, 8, kernel="lmforge")
    reference = debug_model()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, Int8Linear):
                reference.get_submodule(name).weight.copy_(m.dequantized())
        # one token and a short prefill (the kernel), a long prefill (torch's matmul)
        for ids in (random_ids()[:1, :1], random_ids()[:1], random_ids(batch=1, length=40)):
            torch.testing.assert_close(model(ids), reference(ids), rtol=1e-4, atol=1e-4)


def test_layers_bytes_and_errors() -> None:
    model = debug_model()
    fp32 = bytes_per_token(model)
    report = quantize_weights(model, 8, kernel="lmforge")
    assert report.quantized and all(isinstance(model.get_submodule(n), Int8Linear) for n in report.quantized)
    assert 0.24 * fp32 < bytes_per_token(model) < 0.3 * fp32
    with pytest.raises(LmforgeError, match="lmforge for int8"):
        quantize_weights(debug_model(), 4, kernel="lmforge")


def test_cli_int8_on_cpu_uses_the_kernel() -> None:
    model = debug_model()
    apply_quantize(model, "int8")
    assert isinstance(model.lm_head, Int8Linear)


def test_input_gradient_flows_through_the_frozen_layer() -> None:
    layer = Int8Linear(torch.nn.Linear(64, 32))
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized().sum(0).expand(2, 64))
    assert not any(p.requires_grad for p in layer.parameters())


def test_no_compiler_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8_gemv, "kernel", lambda: None)
    q, scale = quantize_int8(torch.randn(24, 48))
    x = torch.randn(1, 48)
    torch.testing.assert_close(int8_linear(x, q, scale), reference_linear(x, q, scale))


def test_kernel_is_built_into_the_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    int8_gemv.kernel.cache_clear()
    try:
        assert int8_gemv.kernel() is not None
        assert [p.suffix for p in (tmp_path / "lmforge" / "kernels").iterdir()].count(".so") == 1
    finally:
        int8_gemv.kernel.cache_clear()


@needs_cc
@pytest.mark.slow  # inductor compiles the step for the CPU (a minute or more on a busy machine)
def test_compiled_int8_greedy_ids_equal_eager() -> None:
    model = debug_model()
    quantize_weights(model, 8, kernel="lmforge")
    params = SamplingParams(greedy=True, max_new_tokens=24)
    for prompt in ([5, 17, 3, 42, 8], [9]):
        eager = generate(model, prompt, params)
        assert generate(model, prompt, Strategy(sampling=params, compile=True)) == eager
