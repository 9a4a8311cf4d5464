"""QLoRA: LoRA on a frozen int8/int4 base (torchao quantization): logits near the full-precision base, only the
adapter learns, its gradients are those on the dequantized base, the saved adapter applies to the full-precision
base, the merge exports full-precision weights, and the options that do not combine."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tinymodels import debug_model, random_ids, save_checkpoint, text_tokenizer

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.model import load_model
from lmforge.model.quant import DENSE_ROWS, QuantLinear, dequantize, quantize_weights, weight_bytes
from lmforge.peft.config import PeftConfig, apply_peft, load_trained, merge_adapter
from lmforge.peft.io import save_adapter
from lmforge.peft.lora import LoraConfig, LoraLinear, delete_adapter, load_lora_state_dict, lora_state_dict

pytest.importorskip("torchao")

BOUNDS = {"int8": 0.02, "int4": 0.15}  # |logits - fp32 logits| / max |fp32 logit|, as tests/test_quant.py


def qlora(quantize: str, seed: int = 0, **lora):
    model = debug_model(seed=seed)
    cfg = PeftConfig(method="lora", lora=LoraConfig(r=4, targets=["q_proj", "v_proj", "down_proj"],
                                                    quantize=quantize, **lora))
    return model, apply_peft(debug_model(seed=seed), cfg), cfg


def train_losses(model, ids, target, steps: int) -> list[float]:
    """AdamW (lr 1e-2) on the trainable parameters, `steps` steps on one fixed batch."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(ids).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_base_logits_within_bound_and_only_the_adapter_learns(quantize):
    full, model, _ = qlora(quantize)
    ids = random_ids(length=16)
    with torch.no_grad():
        err = (model(ids) - full(ids)).abs().max() / full(ids).abs().max()
    assert 0 < err <= BOUNDS[quantize], err  # B = 0: the QLoRA model is the quantized base
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(m.quantized for m in layers)
    assert any(isinstance(m, QuantLinear) for m in model.modules())  # the non-target linears too
    assert not isinstance(model.lm_head, QuantLinear)  # the fused loss reads lm_head.weight
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    losses = train_losses(model, ids, random_ids(seed=2, length=16), 25)
    assert losses[-1] < losses[0] - 0.5, losses  # seeded: ~5.6 -> ~4.5 on a fixed batch


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_dora_on_a_quantized_base_starts_at_it_and_learns(quantize):
    _, plain, _ = qlora(quantize)
    _, model, _ = qlora(quantize, dora=True, dropout=0.1)
    ids, target = random_ids(length=16), random_ids(seed=2, length=16)
    with torch.no_grad():  # magnitude = the dequantized rows' norms, B = 0: DoRA starts at the quantized base
        torch.testing.assert_close(model(ids), plain(ids), rtol=1e-5, atol=1e-5)
    assert any("lora_magnitude" in n for n, p in model.named_parameters() if p.requires_grad)
    losses = train_losses(model, ids, target, 15)  # dropout on: W xd through the quantized layer
    assert losses[-1] < losses[0] - 0.3, losses  # seeded: ~4.66 -> ~4.26


def trained(model):
    """`model` with a trained-looking adapter: random B (seeded)."""
    torch.manual_seed(5)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            for part in m.adapters["default"].values():
                torch.nn.init.normal_(part.lora_B.weight, std=0.05)
    return model


def dequantized(model):
    """`model` with every quantized weight replaced by its dequantized matrix, a plain frozen tensor."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLinear) and m.quantized:
            m.weight, m.quantized = torch.nn.Parameter(dequantize(m.weight), requires_grad=False), False
        elif isinstance(m, QuantLinear):
            plain = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            plain.weight, plain.bias = torch.nn.Parameter(dequantize(m.weight), requires_grad=False), m.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
    assert not any(isinstance(m, QuantLinear) or getattr(m, "quantized", False) for m in model.modules())
    return model


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("length", [DENSE_ROWS // 2, 4])  # 2 rows of it: the dense path, the quantized kernel
@pytest.mark.parametrize("dora", [False, True])
def test_adapter_gradients_equal_those_on_the_dequantized_base(quantize, length, dora):
    _, model, _ = qlora(quantize, dora=dora)
    trained(model)
    _, reference, _ = qlora(quantize, dora=dora)
    load_lora_state_dict(dequantized(reference), lora_state_dict(model))
    ids, target = random_ids(length=length), random_ids(seed=2, length=length)
    grads = []
    for m in (model, reference):
        m.train()
        F.cross_entropy(m(ids).flatten(0, 1), target.flatten()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[0].values())
    # the dense path runs the same matmuls as the plain model; int8's kernel rounds its sums in another order
    tol = 1e-5 if 2 * length >= DENSE_ROWS or quantize == "int4" else 1e-4
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=tol, atol=tol * 1e-2, msg=name)


@pytest.mark.parametrize(("quantize", "share"), [("int8", 0.3), ("int4", 0.2)])
def test_base_memory_and_the_adapter_applies_to_the_full_precision_base(tmp_path, quantize, share):
    full, model, cfg = qlora(quantize)
    fp32 = sum(p.numel() * 4 for n, m in full.named_modules() if type(m) is torch.nn.Linear
               and n != "lm_head" for p in [m.weight])
    held = sum(weight_bytes(m.weight) for n, m in model.named_modules()
               if isinstance(m, (QuantLinear, LoraLinear)) and n != "lm_head")
    assert held < share * fp32  # int8 + one scale per row; int4 + a scale and a zero point per 64 inputs
    trained(model)
    save_adapter(model, tmp_path / "adapter", cfg.lora)
    base_dir = save_checkpoint(debug_model(), text_tokenizer(), tmp_path / "base")
    exact = load_trained(base_dir, tmp_path / "adapter")  # the adapter on the full-precision base
    ids = random_ids(length=16)
    with torch.no_grad():
        expected, got = exact(ids), model(ids)
        assert (got - expected).abs().max() / expected.abs().max() <= BOUNDS[quantize]
        merged = merge_adapter(model)  # in memory: dequantized base + delta, plain full-precision layers
        assert not any(isinstance(m, (QuantLinear, LoraLinear)) for n, m in merged.named_modules()
                       if n.endswith(("q_proj", "v_proj", "down_proj", "attn.q", "attn.qkv")))
        torch.testing.assert_close(merged(ids), got, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_deleting_the_adapter_gives_back_the_quantized_base(quantize):
    base = debug_model()
    quantize_weights(base, int(quantize[3:]), head=False)  # what QLoRA does before the adapter is added
    _, model, _ = qlora(quantize)
    delete_adapter(trained(model), "default")
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert {n for n, m in model.named_modules() if isinstance(m, QuantLinear)} == \
        {n for n, m in base.named_modules() if isinstance(m, QuantLinear)}
    ids = random_ids(length=16)
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))


def test_options_that_do_not_combine_are_errors(tmp_path, capsys):
    code = main(["sft", "--checkpoint", str(tmp_path / "none"), "--run_dir", str(tmp_path / "r"), "--peft.method",
                 "lora", "--peft.lora.quantize", "int8", "--parallel.data", "ddp"])
    err = capsys.readouterr().err
    assert code != 0 and "runs in one process only" in err and "Traceback" not in err
    with pytest.raises(LmforgeError, match="needs peft.method lora"):
        apply_peft(debug_model(), PeftConfig(method="adapter", lora=LoraConfig(quantize="int4")))


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_sft_with_a_quantized_base_from_the_cli(tmp_path, quantize):
    tok = text_tokenizer()
    base_dir = save_checkpoint(debug_model(tok.vocab_size), tok, tmp_path / "base")
    conversations = tmp_path / "chats.jsonl"
    conversations.write_text("".join(json.dumps({"instruction": f"say {w}", "output": f"{w} {w}"}) + "\n"
                                     for w in ["red", "green", "blue", "warm", "cold", "dark"] * 4))
    code = main(["sft", "--checkpoint", str(base_dir), "--data", str(conversations), "--run_dir",
                 str(tmp_path / "sft"), "--peft.method", "lora", "--peft.lora.quantize", quantize,
                 "--train.steps", "3", "--train.device", "cpu", "--max_len", "32", "--eval_tasks", "0"])
    assert code == 0
    adapter = tmp_path / "sft" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert main(["merge-adapter", "--checkpoint", str(base_dir), "--adapter", str(adapter), "--output",
                 str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")  # full precision: the adapter folded into the base as loaded
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    ids = random_ids(length=8, vocab_size=tok.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), load_trained(base_dir, adapter)(ids), rtol=1e-4, atol=1e-4)
