"""Weight-only quantization (`lmforge.model.quant`, torchao): logits near fp32, gradients through the frozen
layers, int4 storage that dequantizes as torchao does, the dense path for many rows, what is kept and why, the
missing-extra error, and `--quantize` through the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tinymodels import debug_model, random_ids

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.data.shards import ShardWriter
from lmforge.generate.engine import Strategy, generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import quant, save_model
from lmforge.model.quant import (
    DENSE_ROWS,
    Int4Weight,
    QuantLinear,
    apply_quantize,
    bytes_per_token,
    dequantize,
    quantize_weights,
    weight_bytes,
)

pytest.importorskip("torchao")

# |int8 logits - fp32 logits| <= INT8_BOUND * max |fp32 logit| (per-row int8: ~0.4 % weight error per layer)
INT8_BOUND = 0.02
INT4_BOUND = 0.15  # int4, groups of 32-64 inputs


@pytest.mark.parametrize(("bits", "bound"), [(8, INT8_BOUND), (4, INT4_BOUND)])
def test_logits_within_bound_of_fp32(bits: int, bound: float) -> None:
    model = debug_model()
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids)
        report = quantize_weights(model, bits)
        got = model(ids)
    assert report.quantized and all(isinstance(model.get_submodule(n), QuantLinear) for n in report.quantized)
    err = (got - expected).abs().max() / expected.abs().max()
    assert 0 < err <= bound, f"int{bits}: relative logit error {err:.4f}"


def test_int8_reads_a_quarter_of_the_bytes() -> None:
    model = debug_model()
    fp32 = bytes_per_token(model)
    quantize_weights(model, 8)
    # int8 weights plus one fp32 scale per row; the embedding row read stays fp32
    assert 0.24 * fp32 < bytes_per_token(model) < 0.3 * fp32


@pytest.mark.parametrize("bits", [8, 4])
def test_frozen_layer_passes_gradients_to_its_input(bits: int) -> None:
    layer = torch.nn.Linear(128, 64)
    quantize_weights(wrapper := torch.nn.Sequential(layer), bits)
    q = wrapper[0]
    assert isinstance(q, QuantLinear) and not q.weight.requires_grad and not q.bias.requires_grad
    x = torch.randn(3, 128, requires_grad=True)
    (q(x) ** 2).sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    (F.linear(ref_x, dequantize(q.weight), q.bias) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_dequantizes_exactly_as_torchao_dequantize_affine(dtype: torch.dtype) -> None:
    import torchao.quantization.quant_primitives as qp

    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    block = (1, 64)
    scale, zero = qp.choose_qparams_affine(weight.float(), qp.MappingType.ASYMMETRIC, block, torch.uint8, 0, 15)
    q = qp.quantize_affine(weight.float(), block, scale, zero, torch.uint8, 0, 15)
    expected = qp.dequantize_affine(q, block, scale, zero, torch.uint8, 0, 15)
    packed = Int4Weight.quantize(weight, 64)
    assert torch.equal(packed.dequantize(torch.float32), expected)
    assert packed.shape == weight.shape and packed.dtype == dtype and packed.dequantize().dtype == dtype
    assert weight_bytes(packed) == 96 * 128 + 96 * 4 * (4 + 1)  # nibbles, fp32 scale + uint8 zero per group
    moved = torch.nn.Parameter(packed, requires_grad=False).to(torch.bfloat16)  # a module's .to(dtype)
    assert type(moved) is Int4Weight and torch.equal(moved.dequantize(torch.float32), expected)
    with pytest.raises(NotImplementedError, match="dequantize"):
        packed + 1


@pytest.mark.parametrize("bits", [8, 4])
def test_many_rows_multiply_the_dequantized_weight_few_rows_the_quantized_kernel(
        bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    wrapper = torch.nn.Sequential(torch.nn.Linear(128, 64))
    quantize_weights(wrapper, bits)
    layer = wrapper[0]
    calls = []

    def counted(weight, dtype=torch.float32):
        calls.append(dtype)
        return dequantize(weight, dtype)

    monkeypatch.setattr(quant, "dequantize", counted)
    few = torch.randn(DENSE_ROWS - 1, 128, requires_grad=True)
    layer(few).sum().backward()
    forward_dequantized = len(calls) - 1  # the backward always multiplies by the dequantized weight
    assert forward_dequantized == (1 if bits == 4 else 0)  # int8 decodes through torchao's kernel
    calls.clear()
    many = torch.randn(2, DENSE_ROWS // 2, 128, requires_grad=True)
    out = layer(many)
    assert len(calls) == 1
    plain = torch.nn.Linear(128, 64)
    plain.weight.data, plain.bias.data = dequantize(layer.weight), layer.bias.detach().clone()
    reference = many.detach().clone().requires_grad_()
    torch.testing.assert_close(out, plain(reference), rtol=0, atol=0)  # the same dense matmul
    out.square().sum().backward()
    plain(reference).square().sum().backward()
    assert len(calls) == 2  # dequantized again in the backward, not kept
    torch.testing.assert_close(many.grad, reference.grad, rtol=1e-6, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(many).dtype == torch.bfloat16 and calls[-1] == torch.bfloat16  # dequantized to the compute dtype


def test_head_skip_and_unfit_layers_are_reported() -> None:
    model = debug_model(d_model=48)  # no int4 group (32-128 inputs) divides 48 inputs; d_ff 128 does
    report = quantize_weights(model, 4)
    assert "lm_head" in report.kept and "multiple of 32" in report.kept["lm_head"]
    assert report.quantized == ["blocks.0.mlp.down", "blocks.1.mlp.down"]
    assert type(model.lm_head) is torch.nn.Linear and "kept 7 in full precision" in report.summary()
    model = debug_model()
    report = quantize_weights(model, 8, head=False, skip=("wo",))
    assert report.kept["lm_head"] == "skipped" and all(n.endswith("wo") for n in report.kept if n != "lm_head")
    assert model.embed.weight is not None and type(model.lm_head) is torch.nn.Linear


def test_bad_bits_and_missing_torchao_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LmforgeError, match="bits must be 8 or 4"):
        quantize_weights(debug_model(), 3)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(LmforgeError, match=r"lmforge\[quant\]"):
        quantize_weights(debug_model(), 8)


def _generate_json(checkpoint: Path, capsys: pytest.CaptureFixture, *extra: str) -> dict:
    assert main(["generate", "--checkpoint", str(checkpoint), "--input-ids", "5 17 3 42 8", "--sampling.greedy",
                 "--json", "--sampling.max-new-tokens", "12", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_quantize_decodes_the_quantized_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = save_model(debug_model(), tmp_path / "model")
    for mode, bits in (("int8", 8), ("int4", 4)):
        got = _generate_json(checkpoint, capsys, "--quantize", mode, "--device", "cpu")
        model = debug_model()
        quantize_weights(model, bits)
        assert got["ids"] == generate(model, [5, 17, 3, 42, 8], SamplingParams(greedy=True, max_new_tokens=12))
    assert main(["generate", "--checkpoint", str(checkpoint), "--input-ids", "1", "--quantize", "int3"]) == 2
    assert "quantize" in capsys.readouterr().err


def test_quantize_refuses_an_unmerged_adapter() -> None:
    model = debug_model()
    with pytest.raises(LmforgeError, match="merge-adapter"):
        apply_quantize(model, "int8", adapter=True)
    assert apply_quantize(model, "none", adapter=True) is None and type(model.lm_head) is torch.nn.Linear


@pytest.mark.slow  # inductor compiles the step for the CPU (a minute or more on a busy machine)
def test_compiled_int8_decode_matches_eager_int8() -> None:
    model = debug_model()
    quantize_weights(model, 8)
    params = SamplingParams(greedy=True, max_new_tokens=24)
    prompt = [5, 17, 3, 42, 8]
    assert generate(model, prompt, Strategy(sampling=params, compile=True)) == generate(model, prompt, params)


def test_eval_cli_quantize_changes_the_loss_a_little(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_model(debug_model(max_seq_len=32), tmp_path / "model")
    with ShardWriter(tmp_path / "data", 100) as w:
        w.add(random_ids(batch=1, length=4 * 16 + 1)[0].numpy(), n_bytes=130)
    losses = {}
    for mode in ("none", "int8"):
        assert main(["eval", "--checkpoint", str(tmp_path / "model"), "--data", str(tmp_path / "data"),
                     "--seq_len", "16", "--device", "cpu", "--quantize", mode]) == 0
        out, err = capsys.readouterr()
        losses[mode] = json.loads(out.strip().splitlines()[-1])["loss"]
        assert ("int8 weights: 9 linear layers quantized" in err) == (mode == "int8")
    assert losses["int8"] != losses["none"] and losses["int8"] == pytest.approx(losses["none"], rel=0.01)
