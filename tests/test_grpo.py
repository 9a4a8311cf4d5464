"""GRPO: group advantages, k3 KL, clipped objective on hand-computed values; rollouts; a short end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch
from tinymodels import mha_model as tiny_model
from tinymodels import reward_model_dir, save_checkpoint
from tinymodels import text_tokenizer as tiny_tokenizer

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.generate.sampling import SamplingParams
from lmforge.posttrain.grpo import GrpoConfig, run_grpo
from lmforge.posttrain.rl_losses import clipped_surrogate, group_advantages, grpo_loss, k3_kl, masked_mean
from lmforge.posttrain.rollout import RolloutBatches, pack_sequences, token_logps

T = torch.tensor


def test_group_advantages_by_hand():
    # group 1: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3); group 2 all equal -> 0
    adv = group_advantages(T([1.0, 0, 0, 1, 1, 1, 1, 1]), group_size=4, eps=1e-4)
    s = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(adv, T([s, -s, -s, s, 0, 0, 0, 0]))
    with pytest.raises(ValueError):
        group_advantages(T([1.0, 2, 3]), 2)


def test_k3_kl_by_hand_and_nonnegative():
    # logp = -1, ref = -2: diff = -1 -> e^-1 + 1 - 1 = 0.36788
    torch.testing.assert_close(k3_kl(T([-1.0]), T([-2.0])), T([math.exp(-1)]))
    x = torch.randn(100)
    assert (k3_kl(x, torch.randn(100)) >= 0).all() and k3_kl(x, x).abs().max() == 0


def test_clipped_surrogate_by_hand():
    old = T([[0.0, 0.0, 0.0]])
    logps = torch.log(T([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    loss, clipped = clipped_surrogate(logps, old, T([2.0]), clip_eps=0.2)
    # A>0: min(1.5*2, 1.2*2)=2.4 (clipped); min(0.5*2, 0.8*2)=1.0 (unclipped); 1.1*2=2.2
    torch.testing.assert_close(loss, -T([[2.4, 1.0, 2.2]]))
    assert clipped.tolist() == [[1.0, 0.0, 0.0]]
    loss, clipped = clipped_surrogate(logps, old, T([-1.0]), clip_eps=0.2)
    # A<0: min(-1.5, -1.2) = -1.5; min(-0.5, -0.8) = -0.8 (clipped); -1.1
    torch.testing.assert_close(loss, T([[1.5, 0.8, 1.1]]))
    assert clipped.tolist() == [[0.0, 1.0, 0.0]]


def test_grpo_loss_sequence_vs_token_norm_and_kl():
    logps = torch.zeros(2, 3)
    mask = T([[1.0, 1, 1], [1, 0, 0]])
    adv = T([1.0, -1.0])
    loss, stats = grpo_loss(logps, logps, None, adv, mask, norm="sequence")
    assert loss.item() == pytest.approx(0.0)  # (-1 + 1) / 2
    loss, _ = grpo_loss(logps, logps, None, adv, mask, norm="token")
    assert loss.item() == pytest.approx((-3 + 1) / 4)
    ref = torch.full((2, 3), -1.0)
    loss, stats = grpo_loss(logps, logps, ref, adv, mask, kl_coef=0.5)
    kl = math.exp(-1)  # diff = -1
    assert stats["kl"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.5 * kl)


def test_grpo_gradient_raises_good_samples():
    """One step on the loss moves probability toward the positive-advantage token."""
    logits = torch.zeros(2, 1, 4, requires_grad=True)
    labels = T([[1], [2]])
    lp = token_logps(logits, labels)
    loss, _ = grpo_loss(lp, lp.detach(), None, T([1.0, -1.0]), torch.ones(2, 1))
    loss.backward()
    assert logits.grad[0, 0, 1] < 0 and logits.grad[1, 0, 2] > 0


def test_pack_sequences_masks_prompts():
    ids, labels = pack_sequences([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 5], [4, 7, 8, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [7, 8, 9, IGNORE_INDEX]]


def test_rollout_batches_reuse_each_rollout_for_epochs():
    made = []

    def make(i):
        made.append(i)
        return {"x": torch.arange(8) + 100 * i}

    b = RolloutBatches(make, epochs=2, minibatches=2, seed=0)
    seen = [b.next_batch()["x"] for _ in range(4)]
    assert made == [0]
    assert sorted(torch.cat(seen[:2]).tolist()) == list(range(8)) == sorted(torch.cat(seen[2:]).tolist())
    b.next_batch()
    assert made == [0, 1] and b.state_dict() == {"index": 2}


def test_rank_slices_of_a_rollout_minibatch_scale_to_its_global_means():
    """Averaged over ranks (as DDP/FSDP average gradients), each rank's scaled sequence and token means are the
    global minibatch's, also when the rows do not split evenly."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(7, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1
    batch = {"mask": mask, "x": torch.randn(7, 5, generator=g)}
    for world in (1, 2, 3):
        slices = [RolloutBatches.rank_slice(batch, r, world) for r in range(world)]
        assert torch.cat([s["x"] for s in slices]).equal(batch["x"])
        seq = sum(s["row_scale"] * masked_mean(s["x"], s["mask"], dim=1).mean() for s in slices) / world
        tok = sum(s["token_scale"] * masked_mean(s["x"], s["mask"]) for s in slices) / world
        torch.testing.assert_close(seq, masked_mean(batch["x"], mask, dim=1).mean())
        torch.testing.assert_close(tok, masked_mean(batch["x"], mask))
    with pytest.raises(ValueError, match="cannot give each of 8 ranks one"):
        RolloutBatches.rank_slice(batch, 0, 8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = tiny_tokenizer()
    return save_checkpoint(tiny_model(tok.vocab_size), tok, tmp_path_factory.mktemp("grpo") / "base")


def test_grpo_end_to_end_raises_the_reward_and_saves(checkpoint, tmp_path):
    """Seeded: against a (random) reward model, the third rollout scores clearly higher than the first."""
    rm = reward_model_dir(tiny_tokenizer(), tmp_path / "rm")
    cfg = from_dict(GrpoConfig, {
        "checkpoint": str(checkpoint), "run_dir": str(tmp_path / "run"), "group_size": 4, "epochs": 2,
        "minibatches": 2, "rollout": {"prompts_per_rollout": 4, "eval_prompts": 6},
        "reward": "model", "reward_model": str(rm),
        "sampling": {"max_new_tokens": 6}, "train": {"steps": 12, "lr": 3e-2, "device": "cpu", "log_every": 1,
                                                     "eval_every": 0}})
    out = run_grpo(cfg)
    assert out["rollouts"] == 3 and out["steps"] == 12
    rows = [r for r in map(eval_json, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "kl" in r]
    assert {"reward", "kl", "clip_frac", "entropy"} <= set(rows[0])
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first minibatch: policy == reference
    # a rollout is served as 4 minibatches (2 epochs x 2), so 4 rows average to the rollout's mean reward
    first, last = (sum(r["reward"] for r in rows[i:i + 4]) / 4 for i in (0, 8))
    assert last > first + 0.1  # ~0.17-0.2 with this seeded random reward model
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def eval_json(line: str) -> dict:
    import json

    return json.loads(line)


def test_grpo_config_errors():
    with pytest.raises(ConfigError, match="group_size"):
        from_dict(GrpoConfig, {"group_size": 1})
    with pytest.raises(ConfigError, match="reward_model"):
        from_dict(GrpoConfig, {"reward": "model"})
    with pytest.raises(ConfigError, match="minibatches"):
        from_dict(GrpoConfig, {"group_size": 2, "minibatches": 3, "rollout": {"prompts_per_rollout": 1}})
    with pytest.raises(ConfigError, match="sampling.max_new_tokens"):
        from_dict(GrpoConfig, {"sampling": {"max_new_tokens": 0}})


def test_rollout_sampling_is_one_sampling_section():
    """`--sampling.*` as in rejection-sample; the defaults are what rollouts always used (16 new tokens)."""
    cfg = from_dict(GrpoConfig, {"sampling": {"temperature": 0.8}})
    assert cfg.sampling == SamplingParams(temperature=0.8, max_new_tokens=16)


def test_rollout_logps_are_the_sampling_policys_at_its_temperature(checkpoint):
    """pi_old of a rollout sampled at temperature 0.5 is softmax(logits / 0.5), as TRL divides the logits."""
    from lmforge.posttrain.models import load_policy
    from lmforge.posttrain.rl import sample_rollout
    from lmforge.tasks.prompts import task_prompts
    from lmforge.tasks.suite import make_examples

    model, tok = load_policy(str(checkpoint), "cpu")
    params = SamplingParams(temperature=0.5, max_new_tokens=4)
    batch, _ = sample_rollout(model, tok, params, task_prompts(make_examples(2)), 2,
                              lambda ex, texts: torch.zeros(len(texts)), seeds=[0, 1])
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(batch["input_ids"]).float() / 0.5, -1)
    labels = batch["labels"]
    expected = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * batch["mask"]
    torch.testing.assert_close(batch["old_logps"], expected)


def test_rl_rejects_greedy_rollouts():
    with pytest.raises(ConfigError, match="sampling.temperature"):
        from_dict(GrpoConfig, {"sampling": {"temperature": 0}})
