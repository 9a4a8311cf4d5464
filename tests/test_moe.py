import math

import pytest
import torch
import torch.nn.functional as F

import lmforge.model.moe as moe_module
from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.moe import MoE, load_balance_loss, router_z_loss
from lmforge.train.moe_balance import MoEBalancer, load_stats, update_bias


def moe_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, moe_experts=8, moe_top_k=2,
                moe_d_ff=16)
    return ModelConfig(**{**base, **overrides})


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: sum_k w_k * SwiGLU_e(x) with the router's own choices (+ shared experts)."""
    flat = x.reshape(-1, x.shape[-1])
    weights, experts, _, _ = moe.router(flat)
    rows = []
    for t in range(flat.shape[0]):
        y = torch.zeros_like(flat[t])
        for w, e in zip(weights[t], experts[t]):
            gate, up = (moe.experts.up[e] @ flat[t]).chunk(2)
            y = y + w * (moe.experts.down[e] @ (F.silu(gate) * up))
        rows.append(y)
    out = torch.stack(rows).view_as(x)
    return out + moe.shared(x) if moe.shared is not None else out


@pytest.mark.parametrize("overrides", [
    dict(),  # GLaM-style softmax top-2
    dict(moe_top_k=1),  # Switch top-1
    dict(moe_router="sigmoid", moe_norm_top_k=True, moe_routed_scale=2.5, moe_groups=4, moe_top_groups=2,
         moe_shared_experts=2),  # DeepSeekMoE
])
@pytest.mark.parametrize("grouped", [True, False])
def test_dispatch_matches_token_by_token_reference(overrides, grouped, monkeypatch):
    monkeypatch.setattr(moe_module, "USE_GROUPED_MM", grouped and moe_module.USE_GROUPED_MM)
    torch.manual_seed(0)
    moe = MoE(moe_cfg(**overrides))
    torch.nn.init.normal_(moe.router.gate.weight, std=0.5)
    moe.router.bias.normal_(0, 0.1)
    x = torch.randn(3, 5, 32)
    ours, ref = moe(x), reference(moe, x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(y.square().sum(), [moe.experts.up, moe.experts.down, moe.router.gate.weight])
             for y in (ours, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_skewed_loads_take_the_per_expert_loop_and_agree(monkeypatch):
    monkeypatch.setattr(moe_module, "USE_GROUPED_MM", False)
    torch.manual_seed(0)
    moe = MoE(moe_cfg())
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0] = 5 * x.reshape(-1, 32).mean(0)  # almost every token to expert 0 (+ 1 other)
    weights, experts, _, _ = moe.router(x.reshape(-1, 32))
    counts = torch.bincount(experts.flatten(), minlength=8)
    assert 8 * counts.max() > 2 * experts.numel()  # padding would more than double the work: loop path
    torch.testing.assert_close(moe(x), reference(moe, x), atol=1e-5, rtol=1e-5)


def test_capacity_drops_late_tokens():
    """Switch: capacity = ceil(1.0 * 4 tokens * 1 / 2 experts) = 2; all four want expert 0, the last two are
    dropped and get a zero FFN output (the residual carries them)."""
    moe = MoE(moe_cfg(moe_experts=2, moe_top_k=1, moe_capacity_factor=1.0))
    assert moe.capacity(4) == 2
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0] = 10.0
    x = torch.randn(1, 4, 32)
    x[..., 0] = 1.0
    y = moe(x)
    assert (y[0, 2:] == 0).all() and (y[0, :2].abs().sum(-1) > 0).all()
    # utilization counts the router's choices (4 for expert 0, none for expert 1), before dropping
    assert MoEBalancer()(torch.nn.Sequential(moe), 1) == {"moe_dropped_frac": 0.5, "moe_load_max_min": 4.0,
                                                           "moe_load_max_mean": 2.0}
    unlimited = MoE(moe_cfg(moe_experts=2, moe_top_k=1))
    unlimited.load_state_dict(moe.state_dict())
    torch.testing.assert_close(unlimited(x)[0, :2], y[0, :2])


def test_capacity_keeps_first_choices_before_second_choices():
    """Top-2 of 2 experts, capacity ceil(0.5 * 4 * 2 / 2) = 2: tokens 0, 1 prefer expert 0 and tokens 2, 3
    expert 1. First choices take the slots, so every token keeps its first expert and loses its second."""
    moe = MoE(moe_cfg(moe_experts=2, moe_top_k=2, moe_capacity_factor=0.5))
    assert moe.capacity(4) == 2
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0] = moe.router.gate.weight[1, 1] = 5.0
    x = torch.zeros(1, 4, 32)
    x[0, :2, 0] = x[0, 2:, 1] = 1.0
    flat = x.reshape(4, 32)
    weights, experts, _, _ = moe.router(flat)
    assert experts[:, 0].tolist() == [0, 0, 1, 1]
    first_only = weights[:, :1] * torch.stack([moe.experts._ffn(flat[t], moe.experts.up[e], moe.experts.down[e])
                                                for t, e in enumerate(experts[:, 0].tolist())])
    torch.testing.assert_close(moe(x)[0], first_only)


def test_balance_loss_hand_values():
    E, T = 4, 8
    uniform = torch.full((T, E), 1 / E)
    round_robin = torch.arange(T)[:, None] % E
    assert load_balance_loss(uniform, round_robin, E).item() == pytest.approx(1.0)  # the balanced minimum
    collapsed = torch.zeros(T, E)
    collapsed[:, 0] = 1.0
    assert load_balance_loss(collapsed, torch.zeros(T, 1, dtype=torch.long), E).item() == pytest.approx(E)
    # sequence-wise: each sequence balanced on its own gives 1.0 even if the batch is not mixed
    seq_probs = torch.stack([uniform, uniform])
    seq_ids = torch.stack([round_robin, round_robin])
    assert load_balance_loss(seq_probs, seq_ids, E).item() == pytest.approx(1.0)
    assert router_z_loss(torch.zeros(5, E)).item() == pytest.approx(math.log(E) ** 2)


def test_group_limited_routing_stays_in_top_groups():
    cfg = moe_cfg(moe_router="sigmoid", moe_groups=4, moe_top_groups=1, moe_top_k=2, moe_norm_top_k=True)
    moe = MoE(cfg)
    x = torch.randn(64, 32)
    _, experts, _, scores = moe.router(x)
    assert (experts // 2 == experts[:, :1] // 2).all()  # both experts from one group of 2
    best_group = scores.view(-1, 4, 2).topk(2, dim=-1).values.sum(-1).argmax(-1)
    assert (experts[:, 0] // 2 == best_group).all()


def test_aux_losses_reach_the_router_and_vanish_in_eval():
    torch.manual_seed(0)
    model = Transformer(moe_cfg(moe_aux_loss_weight=0.01, moe_z_loss_weight=0.001, moe_first_dense=1))
    assert type(model.blocks[0].mlp).__name__ == "MLP" and isinstance(model.blocks[1].mlp, MoE)
    x = torch.randint(0, 64, (2, 16))
    model(x)
    aux = model.aux_losses()
    assert set(aux) == {"moe_aux"} and aux["moe_aux"] > 0
    aux["moe_aux"].backward()
    assert model.blocks[1].mlp.router.gate.weight.grad.abs().sum() > 0
    assert model.aux_losses() == {}  # taken once
    model.eval()
    model(x)
    assert model.aux_losses() == {}


def balance_run(rate: float, steps: int) -> tuple[list[float], torch.Tensor]:
    torch.manual_seed(0)
    cfg = moe_cfg(moe_router="sigmoid", moe_norm_top_k=True, moe_bias_update_rate=rate, n_layers=1)
    model = Transformer(cfg)
    router = model.blocks[0].mlp.router
    with torch.no_grad():  # skew: experts 0 and 1 lean towards the average token's direction
        router.gate.weight.normal_(0, 0.3)
        feat = model.blocks[0].mlp_norm(model.embed.weight).mean(0)
        router.gate.weight[:2] += 8 * feat / feat.norm()
    balancer = MoEBalancer(rate)
    x = torch.randint(0, 64, (8, 32))
    ratios = []
    with torch.no_grad():
        for step in range(steps):
            model(x)
            ratios.append(balancer(model, step)["moe_load_max_mean"])
    return ratios, router.bias


def test_bias_update_balances_a_skewed_router_without_aux_loss():
    """DeepSeek-V3 aux-loss-free balancing: the router weights never change (no gradient, no aux loss);
    the +-gamma bias steps alone even out the loads (max expert load / mean load)."""
    ratios, bias = balance_run(0.01, 200)
    control, _ = balance_run(0.0, 3)
    assert ratios[0] > 2.4 and min(control) > 2.4  # without updates the skew stays
    assert max(ratios[-20:]) < 1.5
    assert bias[:2].max() < bias[2:].min()  # the overloaded experts were pushed down


def test_update_bias_and_stats_hand_values():
    bias = update_bias(torch.zeros(4), torch.tensor([10.0, 2.0, 4.0, 4.0]), 0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert load_stats(torch.tensor([6.0, 2.0, 4.0, 4.0])) == {"max_min": 3.0, "max_mean": 1.5}


def test_config_errors_are_one_line():
    for bad in (dict(moe_experts=4, moe_top_k=5), dict(moe_experts=6, moe_groups=4),
                dict(moe_experts=8, moe_bias_update_rate=0.01), dict(moe_experts=8, moe_groups=4, moe_top_groups=1,
                                                                     moe_top_k=3)):
        with pytest.raises(ConfigError) as e:
            from_dict(ModelConfig, {"d_model": 32, "n_heads": 4, **bad}, "model.")
        assert "\n" not in str(e.value) and "model.moe_" in str(e.value)


def test_moe_tiny_preset_matches_tiny_active_params():
    from lmforge.model.size import active_params, flops_per_token, num_params

    tiny = from_dict(ModelConfig, {"preset": "tiny", "vocab_size": 256}, "model.")
    moe = from_dict(ModelConfig, {"preset": "moe-tiny", "vocab_size": 256}, "model.")
    assert num_params(moe) > 2.5 * num_params(tiny)
    assert abs(active_params(moe) - num_params(tiny)) / num_params(tiny) < 0.01
    assert abs(flops_per_token(moe, 256) / flops_per_token(tiny, 256) - 1) < 0.01  # FLOPs follow active params


def test_bf16_autocast_runs_the_experts_in_bf16_with_fp32_grads():
    torch.manual_seed(0)
    moe = MoE(moe_cfg())
    torch.nn.init.normal_(moe.router.gate.weight, std=0.5)
    x = torch.randn(2, 8, 32)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    err = ((y.float() - ref) / ref.abs().max()).abs().max()
    assert 0 < err < 0.03  # bf16 rounding, not another routing
    y.float().sum().backward()
    assert moe.experts.up.grad.dtype == torch.float32 and moe.experts.up.grad.abs().sum() > 0
