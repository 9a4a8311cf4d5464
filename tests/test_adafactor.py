"""Adafactor: step-by-step parity with transformers' implementation, state layout, checkpoints, the loop."""

import pytest
import torch
from fakes import RepeatedBatch

from lmforge.checkpoint.store import optimizer_from_files, optimizer_to_files
from lmforge.core.config import from_dict
from lmforge.model import ModelConfig, Transformer
from lmforge.train.adafactor import Adafactor
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizer
from lmforge.train.pretrain import lm_loss
from lmforge.train.trainer import train_loop

transformers_optimization = pytest.importorskip("transformers.optimization")

STEPS = 25
# fp32; the implementations differ only in op order (lerp vs mul+add), so they agree to rounding
RTOL, ATOL = 1e-5, 1e-6


def make_params(seed: int = 0) -> list[torch.Tensor]:
    """A matrix, a 3-d tensor (factored over its last two dims), a vector and a scalar."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 5, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(5, generator=g),
            torch.randn((), generator=g)]


def quadratic_loss(params: list[torch.Tensor], step: int) -> torch.Tensor:
    """A different target every step, so the second moments keep changing."""
    g = torch.Generator().manual_seed(1000 + step)
    return sum(((p - torch.randn(p.shape, generator=g)) ** 2 * (1 + i)).sum() for i, p in enumerate(params))


def run(make_optimizer) -> list[list[torch.Tensor]]:
    params = [p.clone().requires_grad_() for p in make_params()]
    opt = make_optimizer(params)
    history = []
    for step in range(STEPS):
        opt.zero_grad()
        quadratic_loss(params, step).backward()
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history


CASES = {  # name: (our kwargs, transformers' kwargs)
    "t5_defaults": ({}, {"lr": None}),
    "palm_momentum_decay": ({"beta1": 0.9, "weight_decay": 0.1},
                            {"lr": None, "beta1": 0.9, "weight_decay": 0.1}),
    "external_lr_no_scaling": ({"lr": 3e-2, "relative_step": False, "scale_parameter": False},
                               {"lr": 3e-2, "relative_step": False, "scale_parameter": False}),
    "external_lr_tight_clip": ({"lr": 1e-2, "relative_step": False, "clip_threshold": 0.1, "decay_rate": -0.5},
                               {"lr": 1e-2, "relative_step": False, "clip_threshold": 0.1, "decay_rate": -0.5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers_step_by_step(case):
    ours_kw, hf_kw = CASES[case]
    ours = run(lambda ps: Adafactor(ps, **ours_kw))
    ref = run(lambda ps: transformers_optimization.Adafactor(ps, **hf_kw))
    worst = 0.0
    for step, (a_params, b_params) in enumerate(zip(ours, ref)):
        for a, b in zip(a_params, b_params):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=f"{case}, step {step + 1}")
            worst = max(worst, (a - b).abs().max().item())
    moved = max((a - b).abs().max().item() for a, b in zip(ours[-1], make_params()))
    assert moved > 1e-2  # the parameters really moved, so agreement is not vacuous
    print(f"{case}: max |ours - transformers| over {STEPS} steps = {worst:.2e} (moved {moved:.3f})")


def test_factored_state_is_rows_and_columns():
    params = [p.clone().requires_grad_() for p in make_params()]
    opt = Adafactor(params, beta1=0.9)
    quadratic_loss(params, 0).backward()
    opt.step()
    matrix, cube, vector, scalar = (opt.state[p] for p in params)
    assert matrix["exp_avg_sq_row"].shape == (6,) and matrix["exp_avg_sq_col"].shape == (5,)
    assert cube["exp_avg_sq_row"].shape == (2, 3) and cube["exp_avg_sq_col"].shape == (2, 4)
    assert "exp_avg_sq" not in matrix and vector["exp_avg_sq"].shape == (5,) and scalar["exp_avg_sq"].shape == ()
    assert matrix["exp_avg"].shape == (6, 5) and matrix["step"] == 1


def test_step_size_rule():
    group = {"lr": 1e-2, "relative_step": True, "scale_parameter": True, "eps2": 1e-3}
    half, zero = torch.tensor(0.5), torch.tensor(0.0)
    assert Adafactor.step_size(group, 1, half).item() == pytest.approx(1e-2 * 0.5)  # min(1e-2, 1) * RMS
    assert Adafactor.step_size(group, 40_000, half).item() == pytest.approx(0.5 / 200)  # 1/sqrt(t) < 1e-2
    assert Adafactor.step_size(group, 1, zero).item() == pytest.approx(1e-2 * 1e-3)  # eps2 floor for zero init
    assert Adafactor.step_size({**group, "relative_step": False, "scale_parameter": False}, 9, half) == 1e-2


def test_state_survives_a_checkpoint_round_trip():
    def fresh():
        params = [p.clone().requires_grad_() for p in make_params()]
        return params, Adafactor(params, beta1=0.9, weight_decay=0.1)

    params, opt = fresh()
    for step in range(3):
        opt.zero_grad()
        quadratic_loss(params, step).backward()
        opt.step()
    tensors, meta = optimizer_to_files(opt)
    params2, opt2 = fresh()
    with torch.no_grad():
        for p, q in zip(params2, params):
            p.copy_(q)
    # clone: on CPU the exported tensors share storage with the live state (a file breaks that in real use)
    opt2.load_state_dict(optimizer_from_files({k: v.clone() for k, v in tensors.items()}, meta))
    for ps, o in ((params, opt), (params2, opt2)):
        o.zero_grad()
        quadratic_loss(ps, 3).backward()
        o.step()
    for a, b in zip(params, params2):
        assert torch.equal(a, b)


def test_train_loop_with_adafactor(tmp_path):
    torch.manual_seed(0)
    model = Transformer(from_dict(ModelConfig, {"preset": "debug", "vocab_size": 64, "max_seq_len": 32}))
    cfg = from_dict(TrainConfig, {"steps": 20, "lr": 0.1, "warmup_steps": 0, "min_lr_ratio": 1.0,
                                  "optimizer": "adafactor", "precision": "fp32", "device": "cpu",
                                  "save_every": 0, "eval_every": 0, "plot_every": 0, "log_every": 1})
    assert isinstance(build_optimizer(model, cfg), Adafactor)
    ids = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    result = train_loop(model, lm_loss, RepeatedBatch((ids[:, :-1], ids[:, 1:])), cfg, tmp_path)
    first = lm_loss(Transformer(model.cfg), (ids[:, :-1], ids[:, 1:]))[0].item()
    assert result["final_loss"] < 0.5 * first  # ~4.2 (ln 64) -> well below half
