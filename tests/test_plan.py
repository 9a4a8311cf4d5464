"""The layout planner: 16 bytes/parameter exactly, published layouts, a real optimizer's state, the command."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.model.config import ModelConfig
from lmforge.model.size import num_params
from lmforge.model.transformer import Transformer
from lmforge.parallel.plan import (
    Layout,
    PlanConfig,
    Sizes,
    activation_bytes_per_layer,
    candidates,
    comm_bytes,
    evaluate,
    kv_cache_bytes,
    plan,
    state_bytes,
)

LLAMA3_405B = dict(vocab_size=128256, d_model=16384, n_layers=126, n_heads=128, n_kv_heads=8, d_ff=53248,
                   mlp="swiglu", norm="rmsnorm", position="rope", max_seq_len=8192)


def preset(name: str, **overrides) -> ModelConfig:
    return from_dict(ModelConfig, {"preset": name, **overrides})


def small() -> ModelConfig:
    return preset("debug", vocab_size=256)


def test_sixteen_bytes_per_parameter_by_zero_stage():
    cfg = small()
    n = num_params(cfg)
    sizes = Sizes.of(cfg, 64)
    one = state_bytes(sizes, Layout())
    assert one == {"params": 2 * n, "grads": 2 * n, "optimizer": 12 * n}
    assert sum(one.values()) == 16 * n
    per_stage = [sum(state_bytes(sizes, Layout(dp=4, zero=z)).values()) for z in range(4)]
    assert per_stage == [16 * n, 4 * n + 12 * n / 4, 2 * n + 14 * n / 4, 16 * n / 4]
    tp_pp = state_bytes(sizes, Layout(dp=2, tp=2, pp=2, zero=1))
    assert tp_pp == {"params": 2 * n / 4, "grads": 2 * n / 4, "optimizer": 12 * n / 8}


def test_activation_formulas_by_hand():
    # Korthikanti et al. 2022 with sequence parallelism, GPT-3 175B at s=2048, t=8: sbh(34 + 5as/h)/t.
    gpt3 = ModelConfig(vocab_size=50257, d_model=12288, n_layers=2, n_heads=96, mlp="gelu", max_seq_len=2048)
    assert activation_bytes_per_layer(gpt3, 2048, 1, 8, paper=True) == 2048 * 12288 * (34 + 80) / 8
    # The adaptation for llama3-8b (GQA 32/8, SwiGLU 14336), bytes per token: norms 2(4h + 4) = 32776;
    # attention 2h + 2(q + 2kv) + 2(q + kv) + 4a + 2q = 8192 + 12288 + 10240 + 128 + 8192 = 39040; MLP 2h + 8f.
    llama = preset("llama3-8b")
    per_token = 32776 + 39040 + 8192 + 8 * 14336
    assert activation_bytes_per_layer(llama, 8192, 1) == 8192 * per_token
    assert activation_bytes_per_layer(llama, 8192, 2, tp=4) == 2 * 8192 * per_token / 4
    # KV cache: 2 (K, V) x 32 layers x 8 heads x 128 x 2 bytes = 128 KiB per token.
    assert kv_cache_bytes(llama, 8192) == 131072 * 8192
    assert kv_cache_bytes(llama, 8192, tp=8, pp=2) == 131072 * 8192 / 16


def test_llama3_405b_published_layout_fits_80gb():
    # Dubey et al. 2024 (Table 4): 16K H100s, TP 8 x PP 16 x DP 128, seq 8192, 16M tokens per step.
    cfg = ModelConfig(**LLAMA3_405B)
    sizes = Sizes.of(cfg, 8192)
    assert 405e9 < sizes.params < 406e9
    published = Layout(dp=128, tp=8, pp=16, zero=1, micro_batch=1, checkpointing=True)
    assert published in candidates(cfg, 16384, 2048, 8)
    setup = PlanConfig(model=cfg, gpus=16384, gpu_memory=80, seq_len=8192, global_batch=2048)
    row = evaluate(published, setup, sizes)
    assert row["fits"]
    mem = row["memory_gib"]
    assert 5.5 < mem["params"] < 6.5  # 405.9e9 x 2 B / 128 ranks
    assert 10 < mem["total"] < 80
    # without recomputation the first stage's 16 micro-batches of 8 layers do not fit
    assert not evaluate(Layout(dp=128, tp=8, pp=16, zero=1), setup, sizes)["fits"]


def test_llama3_8b_dp_only_zero0_does_not_fit_16gb_but_a_sharded_layout_does():
    cfg = preset("llama3-8b")
    setup = PlanConfig(model=cfg, gpus=64, gpu_memory=16, seq_len=8192, global_batch=512)
    row = evaluate(Layout(dp=64, zero=0, checkpointing=True), setup)
    assert not row["fits"] and row["memory_gib"]["total"] > 16 * 8.03e9 / 2**30  # 16 B x 8.03e9 alone
    rows = plan(setup)
    best = rows[0]
    assert best["fits"] and best["memory_gib"]["total"] <= 16
    assert all(r["step_s"] >= best["step_s"] for r in rows if r["fits"])
    assert rows[-1]["fits"] is False


def test_prediction_equals_a_real_mixed_precision_adam_step():
    """bf16 weights and grads + fp32 master copies under torch.optim.AdamW: counted bytes == the planner's."""
    cfg = small()
    model = Transformer(cfg).to(torch.bfloat16)
    master = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.AdamW(master, lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model(ids)
    logits.float().logsumexp(-1).mean().backward()
    for m, p in zip(master, model.parameters(), strict=True):
        m.grad = p.grad.float()
    opt.step()
    for m in master:
        m.grad = None
    with torch.no_grad():
        for m, p in zip(master, model.parameters(), strict=True):
            p.copy_(m)

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)
    states = opt.state_dict()["state"].values()
    measured = {"params": nbytes(model.parameters()), "grads": nbytes(p.grad for p in model.parameters()),
                "optimizer": nbytes(master) + nbytes(t for s in states for t in s.values() if t.dim() > 0)}
    assert measured == state_bytes(Sizes.of(cfg, 16), Layout())


def test_command_table_json_and_errors(capsys):
    argv = ["plan", "--model.preset", "debug", "--model.vocab_size", "256", "--gpus", "4", "--gpu-memory", "1",
            "--seq-len", "64", "--global-batch", "8", "--gpus-per-node", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "best: " in out and "zero" in out and "ignores" in out
    assert main(argv + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["best"] == doc["layouts"][0] and doc["best"]["fits"]
    assert {r["layout"]["tp"] for r in doc["layouts"]} <= {1, 2}  # TP stays inside a 2-GPU node
    assert main(["plan", "--model.preset", "llama3-8b", "--gpus", "1", "--gpu-memory", "16"]) == 1
    assert capsys.readouterr().err.startswith("lmforge: error: no layout fits 16 GiB")
    assert main(["plan", "--model.preset", "debug", "--model.vocab_size", "256", "--gpus", "64",
                 "--global-batch", "7"]) == 1  # TP <= 4 heads, PP <= 2 layers: DP >= 8 cannot split 7
    assert "no layout of 64 GPUs" in capsys.readouterr().err
    assert main(["plan", "--gpus", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpus" in err


@pytest.mark.parametrize("name", ["deepseek-v3-tiny"])
def test_moe_experts_shard_over_ep(name):
    cfg = preset(name, vocab_size=256)
    sizes = Sizes.of(cfg, 64)
    assert 0 < sizes.experts < sizes.params
    rep, ep = (state_bytes(sizes, Layout(dp=4, ep=e))["params"] for e in (1, 4))
    assert rep - ep == pytest.approx(2 * sizes.experts * 3 / 4)
    assert any(lay.ep > 1 for lay in candidates(cfg, 8, 16, 8))


def test_deepseek_v3_published_layout_fits_80gb():
    # DeepSeek-AI 2024 (V3 report, 3.2): 2048 H800s, PP 16 x EP 64 (over 8 nodes) x ZeRO-1 DP, no TP, seq 4096,
    # 15360 sequences per step at the end of the batch-size ramp; recomputation of norms and up-projections.
    cfg = preset("deepseek-v3")
    sizes = Sizes.of(cfg, 4096)
    assert 37e9 < sizes.active < 39e9 and sizes.experts > 0.9 * sizes.params
    published = Layout(dp=128, tp=1, pp=16, ep=64, zero=1, checkpointing=True)
    assert published in candidates(cfg, 2048, 15360, 8)
    setup = PlanConfig(model=cfg, gpus=2048, gpu_memory=80, seq_len=4096, global_batch=15360)
    row = evaluate(published, setup, sizes)
    assert row["fits"] and 5 < row["memory_gib"]["total"] < 80
    assert row["comm_gb"]["ep"] > 0 and row["comm_gb"]["tp"] == 0


def _saved_bytes(cfg: ModelConfig, ids: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward in one forward in `dtype`."""
    model = Transformer(cfg).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(saved.values())


def test_activation_prediction_near_what_autograd_saves_per_block():
    """One more block adds what the planner predicts per layer, within 15% (the rest: the RoPE tables and the
    CPU path's s x s mask, which the planner leaves out)."""
    ids = torch.randint(0, 256, (2, 64))
    one, two = (preset("debug", vocab_size=256, n_layers=n) for n in (1, 2))
    measured = _saved_bytes(two, ids) - _saved_bytes(one, ids)
    predicted = activation_bytes_per_layer(two, 64, 2)
    assert 1.0 <= measured / predicted < 1.15


def test_fp32_precision_equals_a_real_fp32_adamw_step_and_fp32_activations():
    """--precision fp32 (a CPU run: fp32 weights, grads and AdamW, no autocast): 4 + 4 + 8 bytes per parameter,
    counted on a real step, and activations as autograd saves them in fp32."""
    cfg = small()
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, cfg.vocab_size, (2, 16))).logsumexp(-1).mean().backward()
    opt.step()

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)
    states = opt.state_dict()["state"].values()
    measured = {"params": nbytes(model.parameters()), "grads": nbytes(p.grad for p in model.parameters()),
                "optimizer": nbytes(t for s in states for t in s.values() if t.dim() > 0)}
    assert measured == state_bytes(Sizes.of(cfg, 16), Layout(), "fp32")
    ids = torch.randint(0, 256, (2, 64))
    one, two = (preset("debug", vocab_size=256, n_layers=n) for n in (1, 2))
    per_block = _saved_bytes(two, ids, torch.float32) - _saved_bytes(one, ids, torch.float32)
    assert 1.0 <= per_block / activation_bytes_per_layer(two, 64, 2, precision="fp32") < 1.15
    setup = PlanConfig(model=cfg, gpus=2, seq_len=16, global_batch=4, precision="fp32")
    assert evaluate(Layout(), setup)["memory_gib"]["optimizer"] * 2**30 == measured["optimizer"]


def test_communication_volumes_by_hand():
    cfg = small()
    sizes = Sizes.of(cfg, 64)
    n, act = sizes.params, 2 * 64 * 1 * cfg.d_model  # bf16 [b=1, s=64, h]
    ddp = comm_bytes(cfg, sizes, 64, 8, Layout(dp=4))
    assert ddp == {"dp": 2 * 3 / 4 * 2 * n, "tp": 0.0, "pp": 0.0, "ep": 0.0}  # ring all-reduce of bf16 grads
    assert comm_bytes(cfg, sizes, 64, 8, Layout(dp=4, zero=3))["dp"] == 3 * 3 / 4 * 2 * n  # 2 all-gathers + RS
    # TP 2 x PP 2, 8 micro-batches of 1: 4 all-reduces of act per block (1 layer per stage), 2(t-1)/t each
    split = comm_bytes(cfg, sizes, 64, 8, Layout(tp=2, pp=2))
    assert split["tp"] == 4 * 1.0 * act * 1 * 8 and split["pp"] == 2 * act / 2 * 8
    assert comm_bytes(cfg, sizes, 64, 8, Layout(tp=2, checkpointing=True))["tp"] == 6 * act * 2 * 8
