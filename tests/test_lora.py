"""LoRA: wrapping keeps the base model's outputs, only adapters train, merge/unmerge are exact, adapters
switch, and adapter files round-trip with lmforge and with HF PEFT (logits equal both ways)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fakes import RepeatedBatch
from tinymodels import DEBUG_VOCAB, debug_model, hf_model, random_ids, write_hf_llama
from torch import nn

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.model import ModelConfig, Transformer, load_model, save_model
from lmforge.model.size import num_params
from lmforge.peft import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    count_parameters,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
    set_adapter,
)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    """Random A and B, so an adapter visibly changes the outputs and a mis-mapped tensor cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_init_keeps_logits_and_trains_only_lora():
    model = debug_model()
    x = random_ids()
    base_logits = model(x)
    base_keys = set(model.state_dict())
    cfg = LoraConfig(r=4, targets=ALL)
    apply_lora(model, cfg)
    torch.testing.assert_close(model(x), base_logits, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert base_keys <= set(model.state_dict())  # base tensors keep their names
    c = model.cfg
    q, kv, d, ff = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.d_model, c.d_ff
    per_layer = cfg.r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + ff) + (ff + d))
    lora_total = c.n_layers * per_layer
    assert count_parameters(model) == (lora_total, num_params(model.cfg) + lora_total)
    assert isinstance(model.blocks[0].attn.qkv, LoraLinear)
    assert isinstance(model.blocks[1].mlp.down, LoraLinear)


def test_lora_linear_adds_scaled_update_on_its_rows_only():
    torch.manual_seed(0)
    base = nn.Linear(6, 10)
    layer = LoraLinear(base)
    layer.add_part("a", "k_proj", 3, 7, LoraConfig(r=2, alpha=4.0))
    layer.set_adapter("a")
    part = layer.adapters["a"]["k_proj"]
    nn.init.normal_(part.lora_B.weight)
    x = torch.randn(5, 6)
    expected = base(x).detach().clone()
    expected[:, 3:7] += 2.0 * x @ part.lora_A.weight.T @ part.lora_B.weight.T  # alpha / r = 2
    torch.testing.assert_close(layer(x), expected)


def test_scaling_and_rslora():
    assert LoraConfig(r=4, alpha=8.0).scaling == 2.0
    assert LoraConfig(r=4, alpha=8.0, rslora=True).scaling == 4.0
    assert LoraConfig(r=16, alpha=8.0, rslora=True).scaling == pytest.approx(8.0 / math.sqrt(16))
    model = debug_model()
    apply_lora(model, LoraConfig(r=4, alpha=8.0, rslora=True))
    assert model.blocks[0].attn.qkv.adapters["default"]["q_proj"].scaling == 4.0


def test_training_changes_only_lora_then_merge_unmerge_and_merge_lora():
    model = debug_model()
    apply_lora(model, LoraConfig(r=4, targets=ALL))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(4):
        x = random_ids(step)
        loss = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(not torch.equal(params[n], v) for n, v in lora.items())

    x = random_ids()
    unmerged = model(x)
    base_weight = model.blocks[0].attn.qkv.weight.detach().clone()
    for layer in (m for m in model.modules() if isinstance(m, LoraLinear)):
        layer.merge()
    assert not torch.equal(model.blocks[0].attn.qkv.weight, base_weight)
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
    for layer in (m for m in model.modules() if isinstance(m, LoraLinear)):
        layer.unmerge()
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, base_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)

    merged = merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(debug_model().state_dict())
    torch.testing.assert_close(merged(x), unmerged, rtol=0, atol=1e-5)


def test_merged_model_saves_and_loads_as_a_plain_checkpoint(tmp_path):
    model = debug_model()
    apply_lora(model, LoraConfig(r=2))
    randomize_lora(model)
    x = random_ids()
    expected = model(x)
    save_model(merge_lora(model), tmp_path / "merged")
    torch.testing.assert_close(load_model(tmp_path / "merged")(x), expected, rtol=0, atol=1e-5)


def test_two_named_adapters_switch():
    model = debug_model()
    x = random_ids()
    base = model(x)
    apply_lora(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]), "first")
    randomize_lora(model, seed=1)
    first = model(x)
    apply_lora(model, LoraConfig(r=4, targets=["o_proj", "down_proj"]), "second")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".second." in n for n in trainable)  # a new adapter trains, the old one rests
    with torch.no_grad():
        for p in lora_state_dict(model, "second").values():
            p.normal_(std=0.2)
    second = model(x)  # the adapter just applied is active
    assert not torch.allclose(first, second, atol=1e-3) and not torch.allclose(base, second, atol=1e-3)
    set_adapter(model, "first")
    torch.testing.assert_close(model(x), first)
    set_adapter(model, None)
    torch.testing.assert_close(model(x), base)
    with pytest.raises(LmforgeError, match="no LoRA adapter named 'third'"):
        set_adapter(model, "third")
    with pytest.raises(LmforgeError, match="already has a LoRA adapter named 'first'"):
        apply_lora(model, LoraConfig(), "first")


def test_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'q_proj'"):
        LoraConfig(targets=["q_prj"])
    with pytest.raises(ConfigError, match="lora.r must be positive"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="lora.dropout"):
        from_dict(LoraConfig, {"dropout": 1.5}, "lora.")


def test_save_load_round_trip(tmp_path):
    model = debug_model()
    cfg = LoraConfig(r=4, alpha=8.0, targets=["q_proj", "gate_proj", "down_proj"], rslora=True)
    apply_lora(model, cfg)
    randomize_lora(model)
    x = random_ids()
    expected = model(x)
    out = save_adapter(model, tmp_path / "adapter", cfg)
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 4 and written["use_rslora"] is True
    fresh = debug_model()
    assert not torch.allclose(fresh(x), expected, atol=1e-3)
    assert load_adapter(fresh, out) == cfg
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_load_adapter_errors_leave_the_model_untouched(tmp_path):
    model = debug_model()
    cfg = LoraConfig(r=4)
    apply_lora(model, cfg)
    out = save_adapter(model, tmp_path / "a", cfg)
    config = json.loads((out / "adapter_config.json").read_text())
    weights = out / "adapter_model.safetensors"

    def rewrite(**changes):
        (out / "adapter_config.json").write_text(json.dumps({**config, **changes}))

    def load_fails(match, directory=out):
        fresh = debug_model()
        with pytest.raises(LmforgeError, match=match) as err:
            load_adapter(fresh, directory)
        assert "\n" not in str(err.value)
        assert not any(isinstance(m, LoraLinear) for m in fresh.modules())

    load_fails("adapter directory not found", tmp_path / "nope")
    rewrite(peft_type="PREFIX_TUNING")
    load_fails("peft_type 'PREFIX_TUNING' is not supported")
    rewrite(fan_in_fan_out=True)
    load_fails("fan_in_fan_out=True is not supported")
    rewrite(target_modules=["q_proj", "nonsense"])
    load_fails("adapter_config.json: lora.targets: unknown module 'nonsense'")
    rewrite(r=8)  # the tensors have rank 4
    load_fails("adapter_model.safetensors: tensor .* has shape")
    rewrite(target_modules=["q_proj"])  # the file also holds v_proj tensors
    load_fails("tensors that are not LoRA weights.*v_proj")
    rewrite()
    weights.write_bytes(b"not safetensors")
    load_fails("not a readable safetensors file")
    weights.unlink()
    load_fails("weights not found")
    with pytest.raises(LmforgeError, match="rank 4, but the LoraConfig says r=8"):
        save_adapter(model, tmp_path / "b", LoraConfig(r=8))
    with pytest.raises(LmforgeError, match="no LoRA adapter named 'other'"):
        save_adapter(model, tmp_path / "b", cfg, "other")


# ----------------------------------------------------------------------------------------------
# HF PEFT interop


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny random LlamaForCausalLM on disk and the same weights as an lmforge model directory."""
    return write_hf_llama(tmp_path_factory.mktemp("hf"))


def test_lmforge_adapter_loads_in_peft(hf_llama, tmp_path):
    peft = pytest.importorskip("peft")
    hf_dir, lmforge_dir = hf_llama
    model = load_model(lmforge_dir)
    x = random_ids()
    base = model(x)
    cfg = LoraConfig(r=4, alpha=8.0, targets=ALL)
    apply_lora(model, cfg)
    randomize_lora(model)
    ours = model(x)
    assert not torch.allclose(ours, base, atol=1e-3)
    save_adapter(model, tmp_path / "adapter", cfg)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "adapter").eval()(x).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_peft_adapter_loads_in_lmforge(hf_llama, tmp_path):
    peft = pytest.importorskip("peft")
    hf_dir, lmforge_dir = hf_llama
    torch.manual_seed(0)
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL, task_type="CAUSAL_LM", use_rslora=True)
    peft_model = peft.get_peft_model(hf_model(hf_dir), peft_cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    x = random_ids()
    with torch.no_grad():
        theirs = peft_model.eval()(x).logits
    model = load_model(lmforge_dir)
    assert not torch.allclose(model(x), theirs, atol=1e-3)
    cfg = load_adapter(model, tmp_path / "adapter")
    assert cfg.r == 4 and cfg.rslora and sorted(cfg.targets) == sorted(ALL)
    torch.testing.assert_close(model(x), theirs, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# DoRA


def randomize_dora(model: nn.Module, seed: int = 0) -> None:
    """Random A, B and a magnitude moved off its init, so every DoRA term shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_magnitude"):
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_dora_init_is_identity_and_merge_unmerge_restore():
    model = debug_model()
    x = random_ids()
    base = model(x)
    apply_lora(model, LoraConfig(r=4, targets=ALL, dora=True))
    torch.testing.assert_close(model(x), base, rtol=0, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_magnitude") for n in trainable)
    randomize_dora(model)
    adapted = model(x)
    assert not torch.allclose(adapted, base, atol=1e-3)
    weight = model.blocks[0].attn.qkv.weight.detach().clone()
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        layer.merge()
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
    for layer in layers:
        layer.unmerge()
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(merge_lora(model)(x), adapted, rtol=0, atol=1e-5)


def test_dora_gradient_reaches_magnitude_and_low_rank_factors():
    model = debug_model()
    apply_lora(model, LoraConfig(r=2, targets=["q_proj", "down_proj"], dora=True))
    randomize_dora(model)
    model(random_ids()).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_dora_adapter_matches_peft_both_ways(hf_llama, tmp_path):
    peft = pytest.importorskip("peft")
    hf_dir, lmforge_dir = hf_llama
    x = random_ids()
    # lmforge -> PEFT
    model = load_model(lmforge_dir)
    cfg = LoraConfig(r=4, alpha=8.0, targets=ALL, dora=True)
    apply_lora(model, cfg)
    randomize_dora(model)
    ours = model(x)
    save_adapter(model, tmp_path / "ours", cfg)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "ours").eval()(x).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    # PEFT -> lmforge
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(hf_model(hf_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL,
                                                                        use_dora=True, task_type="CAUSAL_LM"))
    randomize_dora(peft_model, seed=2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)
        theirs = peft_model.eval()(x).logits
    peft_model.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    fresh = load_model(lmforge_dir)
    assert load_adapter(fresh, tmp_path / "theirs").dora
    torch.testing.assert_close(fresh(x), theirs, rtol=0, atol=1e-4)


def test_lora_trained_by_train_loop_loads_in_peft_on_the_exported_base(tmp_path):
    """The issue's round trip: lmforge trains a LoRA, `convert to-hf` exports the base, PEFT loads both."""
    peft = pytest.importorskip("peft")

    from lmforge.cli import main
    from lmforge.peft import PeftConfig, apply_peft, save_trained
    from lmforge.train.config import TrainConfig
    from lmforge.train.pretrain import lm_loss
    from lmforge.train.trainer import train_loop

    base = debug_model()
    save_model(base, tmp_path / "base")
    assert main(["convert", "to-hf", str(tmp_path / "base"), str(tmp_path / "hf")]) == 0
    cfg = from_dict(PeftConfig, {"method": "lora", "lora": {"r": 4, "targets": ALL}})
    apply_peft(base, cfg)
    x = random_ids()
    train_loop(base, lm_loss, RepeatedBatch((x[:, :-1], x[:, 1:])),
               from_dict(TrainConfig, {"steps": 5, "lr": 1e-2, "warmup_steps": 1, "precision": "fp32",
                                       "device": "cpu", "eval_every": 0, "save_every": 0, "plot_every": 0}),
               tmp_path / "run")
    ours = base.eval()(x)
    save_trained(base, cfg, tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_model(tmp_path / "hf"), tmp_path / "adapter").eval()(x).logits
    assert not torch.allclose(load_model(tmp_path / "base")(x), ours, atol=1e-3)  # training moved the outputs
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_targets_missing_from_the_model_are_a_config_error():
    cfg = from_dict(ModelConfig, {"preset": "mla-tiny", "vocab_size": DEBUG_VOCAB, "n_layers": 1, "d_model": 64,
                                  "n_heads": 2})
    with pytest.raises(ConfigError, match=r"lora.targets \['v_proj'\] match no layer of this model; it has "
                                          r"down_proj, gate_proj, lm_head, o_proj, up_proj"):
        apply_lora(Transformer(cfg), LoraConfig(targets=["v_proj"]))
    model = apply_lora(Transformer(cfg), LoraConfig(targets=["o_proj"]))  # MLA keeps the LLaMA output projection
    assert any(p.requires_grad for p in model.parameters())
