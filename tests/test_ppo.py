"""PPO: GAE, clipped value loss, KL-shaped rewards and the adaptive controller on hand values; a short run."""

from __future__ import annotations

import json

import pytest
import torch
from tinymodels import mha_model as tiny_model
from tinymodels import reward_model_dir, save_checkpoint
from tinymodels import text_tokenizer as tiny_tokenizer

from lmforge.core.config import from_dict
from lmforge.posttrain.ppo import PpoConfig, kl_shaped_rewards, run_ppo
from lmforge.posttrain.rl_losses import AdaptiveKLController, clipped_value_loss, gae, whiten

T = torch.tensor


def test_gae_by_hand():
    # one row of 3 tokens then padding; gamma 0.9, lambda 0.5
    rewards, values = T([[1.0, 0.0, 2.0, 0.0]]), T([[0.5, 1.0, 1.5, 9.0]])
    mask = T([[1.0, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 2.0 - 1.5  # last token: no bootstrap
    d1 = 0.0 + 0.9 * 1.5 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a2, a1 = d2, d1 + 0.45 * d2
    a0 = d0 + 0.45 * a1
    torch.testing.assert_close(adv, T([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, T([[a0 + 0.5, a1 + 1.0, a2 + 1.5, 0.0]]))
    # gamma = lambda = 1: advantages are reward-to-go minus the value
    adv, _ = gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv[0, :3], T([3.0 - 0.5, 2.0 - 1.0, 2.0 - 1.5]))


def test_clipped_value_loss_by_hand():
    values, old, returns, mask = T([[2.0, 0.0]]), T([[1.0, 0.0]]), T([[3.0, 0.1]]), T([[1.0, 1.0]])
    loss, frac = clipped_value_loss(values, old, returns, mask, clip_eps=0.2)
    # token 0: unclipped (2-3)^2 = 1, clipped (1.2-3)^2 = 3.24 -> 3.24; token 1: 0.01 both
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert frac.item() == pytest.approx(0.5)


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    logps, ref = T([[-1.0, -2.0, -1.0, 0.0]]), T([[-1.5, -2.0, -2.0, 0.0]])
    r = kl_shaped_rewards(T([3.0]), logps, ref, T([[1.0, 1, 1, 0]]), kl_coef=0.1)
    torch.testing.assert_close(r, T([[-0.05, 0.0, -0.1 + 3.0, 0.0]]))


def test_adaptive_kl_controller_and_whiten():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    assert ctl.update(6.0, 10) == pytest.approx(0.1 * 1.02)  # on target: unchanged
    assert AdaptiveKLController(0.1).update(100.0, 10) == 0.1  # fixed
    w = whiten(T([[1.0, 2.0, 3.0, 50.0]]), T([[1.0, 1, 1, 0]]))
    assert w[0, :3].mean().item() == pytest.approx(0, abs=1e-6) and w[0, 3] == 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = tiny_tokenizer()
    return save_checkpoint(tiny_model(tok.vocab_size), tok, tmp_path_factory.mktemp("ppo") / "base")


def test_ppo_end_to_end_raises_the_reward_and_adapts_kl(checkpoint, tmp_path):
    """Seeded: against a (random) reward model, the third rollout scores clearly higher than the first."""
    rm = reward_model_dir(tiny_tokenizer(), tmp_path / "rm")
    cfg = from_dict(PpoConfig, {
        "checkpoint": str(checkpoint), "run_dir": str(tmp_path / "run"), "samples_per_prompt": 4,
        "kl_target": 0.01, "kl_horizon": 20, "rollout": {"prompts_per_rollout": 4, "eval_prompts": 6},
        "reward": "model", "reward_model": str(rm),
        "sampling": {"max_new_tokens": 6}, "train": {"steps": 12, "lr": 3e-2, "device": "cpu", "log_every": 1,
                                                     "eval_every": 0}})
    out = run_ppo(cfg)
    assert out["rollouts"] == 3
    assert out["kl_coef"] != cfg.kl_coef  # the controller moved beta
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r]
    assert {"reward", "kl", "kl_coef", "entropy", "clip_frac", "value_loss"} <= set(rows[0])
    # a rollout is served as 4 minibatches (2 epochs x 2), so 4 rows average to the rollout's mean reward
    first, last = (sum(r["reward"] for r in rows[i:i + 4]) / 4 for i in (0, 8))
    assert last > first + 0.1  # ~0.17-0.2 with this seeded random reward model
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_whiten_uses_the_unbiased_variance_as_trl():
    """TRL's masked_whiten: (x - mean) * rsqrt(masked_var(unbiased=True) + 1e-8) over the masked entries."""
    torch.manual_seed(0)
    x, mask = torch.randn(3, 5), (torch.rand(3, 5) > 0.3).float()
    kept = x[mask > 0]
    expected = (x - kept.mean()) * torch.rsqrt(kept.var(unbiased=True) + 1e-8) * mask
    torch.testing.assert_close(whiten(x, mask), expected)
