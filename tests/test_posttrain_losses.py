"""Preference losses against hand-computed numbers, a tiny model, and (when installed) TRL's math."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmforge.core.config import from_dict
from lmforge.model import ModelConfig, Transformer
from lmforge.posttrain import dpo_loss, reward_accuracy, reward_pair_loss, sequence_logps, simpo_loss
from lmforge.train.objectives import causal_lm_loss

T = torch.tensor

# h = (pc - rc) - (pr - rr) = (-5 + 6) - (-7 + 7) = 1
PC, PR, RC, RR = T([-5.0]), T([-7.0]), T([-6.0]), T([-7.0])


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, T(expected), rtol=0, atol=1e-6)


# ---- sequence_logps -------------------------------------------------------------------------------------------

def test_sequence_logps_uniform_logits_give_minus_log_vocab_per_counted_token():
    logits = torch.zeros(2, 4, 5)
    labels = T([[1, 2, -100, 3], [-100, -100, -100, 4]])
    close(sequence_logps(logits, labels), [-3 * math.log(5), -math.log(5)])
    close(sequence_logps(logits, labels, average=True), [-math.log(5), -math.log(5)])


def test_sequence_logps_matches_manual_gather_and_skips_ignored_positions():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :2] = -100  # prompt
    labels[1, -3:] = -100  # padding
    labels[2, :] = -100  # nothing to count -> 0, not NaN
    sums, counts = [], []
    for b in range(3):
        total, n = 0.0, 0
        for t in range(6):
            if labels[b, t] != -100:
                total += torch.log_softmax(logits[b, t].double(), -1)[labels[b, t]].item()
                n += 1
        sums.append(total)
        counts.append(n)
    torch.testing.assert_close(sequence_logps(logits, labels), T(sums), rtol=0, atol=1e-5)
    averages = [s / max(n, 1) for s, n in zip(sums, counts)]
    torch.testing.assert_close(sequence_logps(logits, labels, average=True), T(averages), rtol=0, atol=1e-5)
    # an ignored label's logit has no effect
    changed = logits.clone()
    changed[0, 0, :] += torch.randn(11) * 5
    changed[0, 0, 0] = 50.0
    torch.testing.assert_close(sequence_logps(changed, labels)[0], sequence_logps(logits, labels)[0])


def test_sequence_logps_custom_ignore_index_and_low_precision_logits_are_fp32():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[:, 0] = 0  # 0 = pad here
    out = sequence_logps(logits.bfloat16(), labels, ignore_index=0)
    assert out.dtype == torch.float32
    expected = sequence_logps(logits.bfloat16().float(), labels.masked_fill(labels == 0, -100))
    torch.testing.assert_close(out, expected)


def test_sequence_logps_rejects_misaligned_shapes():
    with pytest.raises(ValueError, match="do not align"):
        sequence_logps(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))


def test_sequence_logps_of_a_model_is_minus_its_summed_lm_loss():
    torch.manual_seed(0)
    model = Transformer(from_dict(ModelConfig, {"preset": "debug", "vocab_size": 53, "max_seq_len": 16}))
    ids = torch.randint(0, 53, (2, 9))
    inputs, labels = ids[:, :-1], ids[:, 1:].clone()
    labels[:, :3] = -100  # prompt tokens do not count
    logits = model(inputs)
    logps = sequence_logps(logits, labels)
    for b in range(2):
        expected = -causal_lm_loss(logits[b:b + 1], labels[b:b + 1], reduction="sum")
        torch.testing.assert_close(logps[b], expected, rtol=1e-5, atol=1e-5)
    logps.sum().backward()  # differentiable into the model
    assert model.embed.weight.grad is not None


# ---- dpo_loss -------------------------------------------------------------------------------------------------

def test_dpo_sigmoid_ipo_hinge_on_hand_computed_numbers():
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.1)
    close(losses, [0.644397])  # -log sigmoid(0.1)
    close(chosen, [0.1])
    close(rejected, [0.0])
    close(dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")[0], [16.0])  # (1 - 1/(2*0.1))^2
    close(dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")[0], [0.9])  # relu(1 - 0.1)
    close(dpo_loss(PC, PR, RC, RR, beta=2.0, loss_type="hinge")[0], [0.0])  # margin already met


def test_conservative_dpo_label_smoothing():
    # -(0.9) log sigmoid(0.1) - 0.1 log sigmoid(-0.1) = 0.9 * 0.644397 + 0.1 * 0.744397
    close(dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)[0], [0.654397])
    # eps = 0.5: the label is a coin flip, the loss is symmetric in h
    half = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)[0]
    close(half, [0.5 * (0.644397 + 0.744397)])
    close(dpo_loss(PR, PC, RR, RC, beta=0.1, label_smoothing=0.5)[0], half.tolist())


def test_dpo_is_per_example_and_rewards_are_detached():
    pc = T([-5.0, -3.0], requires_grad=True)
    pr = T([-7.0, -3.0], requires_grad=True)
    losses, chosen, rejected = dpo_loss(pc, pr, T([-6.0, -3.0]), T([-7.0, -3.0]), beta=0.1)
    close(losses.detach(), [0.644397, math.log(2)])  # second pair: h = 0
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    # DPO gradient (Rafailov et al. 2023, Sec. 4): d/d log pi(y_w) = -beta * sigmoid(-beta h)
    close(pc.grad, [-0.1 * torch.sigmoid(T(-0.1)).item(), -0.05])
    close(pr.grad, [0.1 * torch.sigmoid(T(-0.1)).item(), 0.05])


def test_dpo_rejects_bad_arguments_naming_them():
    with pytest.raises(ValueError, match="loss_type.*'kto'"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    for eps in (-0.1, 0.6):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(PC, PR, RC, RR, label_smoothing=eps)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=0.0)


# ---- simpo_loss -----------------------------------------------------------------------------------------------

def test_simpo_on_hand_computed_numbers():
    # beta = 2, gamma = 0.5 * 2 = 1: -log sigmoid(2 * (-1 - -2) - 1) = -log sigmoid(1) = 0.313262
    losses, chosen, rejected = simpo_loss(T([-1.0]), T([-2.0]), beta=2.0, gamma_beta_ratio=0.5)
    close(losses, [0.313262])
    close(chosen, [-2.0])
    close(rejected, [-4.0])
    # margin exactly met -> log 2; with eps = 0.1 smoothing the value at z = 1 is 0.313262 + 0.1 * 1
    close(simpo_loss(T([-1.0]), T([-1.5]))[0], [math.log(2)])
    close(simpo_loss(T([-1.0]), T([-2.0]), label_smoothing=0.1)[0], [0.413262])
    with pytest.raises(ValueError, match="label_smoothing"):
        simpo_loss(T([-1.0]), T([-2.0]), label_smoothing=0.7)


# ---- reward model -------------------------------------------------------------------------------------------

def test_reward_pair_loss_with_and_without_margin():
    chosen, rejected = T([2.0, 0.0]), T([1.0, 0.0])
    close(reward_pair_loss(chosen, rejected), [0.313262, math.log(2)])  # -log sigmoid(1), -log sigmoid(0)
    close(reward_pair_loss(chosen, rejected, margin=T([1.0, -1.0])), [math.log(2), 0.313262])


def test_reward_accuracy_counts_ties_as_wrong():
    assert reward_accuracy(T([1.0, 2.0, 3.0]), T([0.0, 3.0, 3.0])) == pytest.approx(1 / 3)
    assert reward_accuracy(T([1.0]), T([0.0])) == 1.0
    with pytest.raises(ValueError, match="at least one pair"):
        reward_accuracy(T([]), T([]))


# ---- parity with TRL (optional) -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trl_cpo():
    """TRL 1.x keeps DPO's math inline in `DPOTrainer._compute_loss` (needs a model); its CPO trainer exposes
    the same sigmoid / cDPO / hinge / IPO / SimPO formulas as a method on (chosen - rejected) log-ratios."""
    pytest.importorskip("trl")
    cpo = pytest.importorskip("trl.experimental.cpo")
    return cpo.CPOTrainer


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_matches_trl(trl_cpo, loss_type, eps):
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(8) * 3 - 20 for _ in range(4))
    beta = 0.3
    ours = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    # fed log-ratios, CPO's logits pc - pr become DPO's h and its rewards beta * (policy - ref)
    trainer = SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=eps,
                              accelerator=SimpleNamespace(device="cpu"))
    theirs = trl_cpo.cpo_loss(trainer, pc - rc, pr - rr)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_simpo_and_sequence_logps_match_trl(trl_cpo):
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 13)
    labels = torch.randint(0, 13, (4, 7))
    labels[:, :2] = -100
    labels[1, -2:] = -100
    # TRL shifts decoder-only labels itself; is_encoder_decoder=True takes them as already aligned
    for average in (False, True):
        theirs = trl_cpo.get_batch_logps(logits, labels.clone(), average_log_prob=average, is_encoder_decoder=True)
        torch.testing.assert_close(sequence_logps(logits, labels, average=average), theirs)
    avg = sequence_logps(logits, labels, average=True)
    pc, pr = avg[:2], avg[2:]
    beta, ratio, eps = 2.5, 0.4, 0.1
    trainer = SimpleNamespace(alpha=0.0, beta=beta, loss_type="simpo", simpo_gamma=ratio * beta, label_smoothing=eps,
                              accelerator=SimpleNamespace(device="cpu"))
    ours = simpo_loss(pc, pr, beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps)
    for a, b in zip(ours, trl_cpo.cpo_loss(trainer, pc, pr)):
        torch.testing.assert_close(a, b)


# ---- IPO per token, as TRL's DPOTrainer computes it -----------------------------------------------------------

def test_dpo_stage_ipo_is_length_normalized_as_trl():
    """The DPO stage's IPO loss on random logits with responses of different lengths equals TRL's DPOTrainer
    `_compute_loss` "ipo" branch: summed log-ratios / completion tokens, then (delta - 1/(2 beta))^2."""
    from lmforge.posttrain.dpo import DpoConfig, batch_loss, precompute_logps
    from lmforge.posttrain.pairs import EncodedPair, PairBatches
    from lmforge.tokenizer.chat import Encoded

    torch.manual_seed(0)
    vocab = 11

    def encoded(prompt: int, response: int) -> Encoded:
        ids = torch.randint(0, vocab, (prompt + response,)).tolist()
        return Encoded(ids[:-1], [-100] * (prompt - 1) + ids[prompt:])

    pairs = [EncodedPair(encoded(3, c), encoded(3, r), str(i)) for i, (c, r) in enumerate([(1, 6), (5, 2), (3, 3)])]
    policy, ref = torch.nn.Embedding(vocab, vocab), torch.nn.Embedding(vocab, vocab)  # ids -> logits
    cfg = from_dict(DpoConfig, {"loss_type": "ipo", "beta": 0.3})
    ref_logps = precompute_logps(ref, pairs, pad_id=0, average=cfg.average_logps)
    batch = PairBatches(pairs, 3, pad_id=0, extra={"ref": ref_logps}).next_batch()
    ours, _ = batch_loss(cfg, policy, batch)

    labels = batch["labels"]
    mask = labels != -100
    safe = labels.masked_fill(~mask, 0)

    def summed(model):
        return (torch.log_softmax(model(batch["input_ids"]), -1).gather(-1, safe[..., None])[..., 0] * mask).sum(1)

    scores = (summed(policy) - summed(ref)).detach()  # TRL: chosen/rejected log-ratios, token-summed
    chosen_scores, rejected_scores = scores.chunk(2)
    chosen_mask, rejected_mask = mask.float().chunk(2)
    delta = chosen_scores / chosen_mask.sum(1) - rejected_scores / rejected_mask.sum(1)
    torch.testing.assert_close(ours.detach(), (delta - 1 / (2 * 0.3)) ** 2)


# ---- KTO, ORPO, RLOO against TRL ------------------------------------------------------------------------------

def test_kto_by_hand_and_as_trls_kto_trainer():
    from lmforge.posttrain.losses import kto_loss, kto_reference_point

    # r = 1 (desirable) and r = -1 (undesirable), z0 = 0, beta 1: both 1 - sigma(1)
    losses, rewards = kto_loss(T([0.0, -3.0]), T([-1.0, -2.0]), T([True, False]), 0.0, beta=1.0,
                               undesirable_weight=2.0)
    s = 1 - 1 / (1 + math.exp(-1))
    close(losses, [s, 2 * s])
    close(rewards, [1.0, -1.0])
    # TRL's KTOTrainer._compute_loss ("kto"): chosen then rejected, KL from mismatched pairs clamped at 0
    torch.manual_seed(0)
    logps, ref = torch.randn(10) * 3 - 20, torch.randn(10) * 3 - 20
    kl_logps, ref_kl_logps = torch.randn(10) - 20, torch.randn(10) - 20.5
    label = torch.rand(10) > 0.4
    beta, wd, wu = 0.2, 1.0, 1.33
    z0 = kto_reference_point(kl_logps, ref_kl_logps)
    ours, _ = kto_loss(logps, ref, label, z0, beta, wd, wu)
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    chosen_losses = 1 - torch.sigmoid(beta * ((logps - ref)[label] - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - (logps - ref)[~label]))
    theirs = torch.cat((wd * chosen_losses, wu * rejected_losses), 0)
    torch.testing.assert_close(torch.cat((ours[label], ours[~label])), theirs)


def test_orpo_matches_trl():
    from lmforge.posttrain.losses import log1mexp, orpo_loss

    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    torch.manual_seed(0)
    pc, pr = -torch.rand(8) * 3 - 1e-3, -torch.rand(8) * 3 - 1e-3  # averaged log-probs, < 0
    x = -torch.rand(100) * 5 - 1e-4
    torch.testing.assert_close(log1mexp(x), orpo.log1mexp(x))
    torch.testing.assert_close(log1mexp(x), torch.log(1 - torch.exp(x)))
    beta = 0.25
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_r, rejected_r, _, _ = orpo.ORPOTrainer.odds_ratio_loss(trainer, pc, pr)
    ours = orpo_loss(pc, pr, beta)
    torch.testing.assert_close(ours[0], -losses)  # TRL returns beta * log sigma(.), and subtracts its mean
    torch.testing.assert_close(ours[1], chosen_r)
    torch.testing.assert_close(ours[2], rejected_r)
    # by hand: P_w = 0.5, P_l = 0.25: odds 1 and 1/3, log-odds ratio log 3
    close(orpo_loss(T([math.log(0.5)]), T([math.log(0.25)]), beta=1.0)[0], [-math.log(3 / 4)])


def test_rloo_advantages_by_hand_and_as_trl():
    from lmforge.posttrain.rl_losses import rloo_advantages

    # group [1, 0, 0, 1]: baselines 1/3, 2/3, 2/3, 1/3
    close(rloo_advantages(T([1.0, 0, 0, 1]), 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    with pytest.raises(ValueError):
        rloo_advantages(T([1.0, 2, 3]), 2)
    # TRL's RLOOTrainer._generate_and_score_completions (no unscorable rows, no normalization)
    torch.manual_seed(0)
    rewards, g = torch.randn(12), 4
    grouped = rewards.view(-1, g)
    baselines = ((grouped.nansum(1, keepdim=True) - grouped) / ((~torch.isnan(grouped)).sum(1, keepdim=True) - 1))
    torch.testing.assert_close(rloo_advantages(rewards, g), rewards - baselines.view(-1))


def test_dpo_stage_orpo_is_sft_plus_odds_ratio_without_a_reference():
    from lmforge.core.errors import ConfigError
    from lmforge.posttrain.dpo import DpoConfig, batch_loss
    from lmforge.posttrain.losses import orpo_loss

    torch.manual_seed(0)
    policy = torch.nn.Embedding(11, 11)
    ids = torch.randint(0, 11, (4, 6))
    labels = torch.randint(0, 11, (4, 6))
    labels[:, :2] = -100
    labels[1, -1] = -100
    cfg = from_dict(DpoConfig, {"orpo": True, "beta": 0.1})
    assert cfg.reference_free
    ours, _ = batch_loss(cfg, policy, {"input_ids": ids, "labels": labels})  # no "ref" in the batch
    chosen, rejected = sequence_logps(policy(ids), labels, average=True).chunk(2)
    torch.testing.assert_close(ours, -chosen + orpo_loss(chosen, rejected, 0.1)[0])
    with pytest.raises(ConfigError, match="label_smoothing"):
        from_dict(DpoConfig, {"orpo": True, "label_smoothing": 0.1})


def test_grpo_rloo_advantage_option():
    from lmforge.core.errors import ConfigError
    from lmforge.posttrain.grpo import GrpoConfig

    assert from_dict(GrpoConfig, {"advantage": "rloo"}).advantage == "rloo"
    with pytest.raises(ConfigError, match="advantage"):
        from_dict(GrpoConfig, {"advantage": "ppo"})
