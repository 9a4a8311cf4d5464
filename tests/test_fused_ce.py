import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import RepeatedBatch
from tinymodels import debug_model

from lmforge.core.config import from_dict
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.data.shards import ShardWriter
from lmforge.model import Transformer, load_model
from lmforge.train import trainer
from lmforge.train.config import TrainConfig
from lmforge.train.fused_ce import linear_cross_entropy
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.pretrain import PretrainConfig, lm_loss, lm_loss_unfused, pretrain
from lmforge.train.trainer import train_loop

D, V = 16, 97


def problem(shape=(3, 50), seed=0, ignored=10, with_bias=False):
    """hidden [*shape, D], head weight [V, D] (and bias), targets [*shape] with the first `ignored` of row 0
    set to IGNORE_INDEX."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, D, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(V, D, generator=g)).requires_grad_()
    bias = torch.randn(V, generator=g).requires_grad_() if with_bias else None
    targets = torch.randint(0, V, shape, generator=g)
    targets.view(-1)[:ignored] = IGNORE_INDEX
    return hidden, weight, bias, targets


def loss_and_grads(loss_fn, hidden, weight, bias, targets):
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    loss = loss_fn(hidden, weight, bias, targets)
    return loss.detach(), torch.autograd.grad(loss, inputs)


def reference(hidden, weight, bias, targets):
    return causal_lm_loss(F.linear(hidden, weight, bias), targets)


def fused(chunk_size=1024, skip_ignored=False):
    return lambda hidden, weight, bias, targets: linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size,
                                                                      bias=bias, skip_ignored=skip_ignored)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 150, 1000])  # N = 150: ragged last chunk, one chunk, > N
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("skip_ignored", [False, True])
def test_value_and_grads_match_the_materialized_logits(chunk_size, with_bias, skip_ignored):
    args = problem(with_bias=with_bias)
    args[3].view(-1)[30:140:3] = IGNORE_INDEX  # ignored rows scattered through every chunk, not only a prefix
    ref_loss, ref_grads = loss_and_grads(reference, *args)
    loss, grads = loss_and_grads(fused(chunk_size, skip_ignored), *args)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    assert len(grads) == len(ref_grads) == (3 if with_bias else 2)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-5)
        assert g.abs().sum() > 0


def test_ignored_rows_get_no_gradient_and_do_not_count_in_the_mean():
    hidden, weight, _, targets = problem(shape=(40,), ignored=15)
    loss, (dh, _) = loss_and_grads(fused(8), hidden, weight, None, targets)
    assert torch.all(dh[:15] == 0) and torch.all(dh[15:].abs().sum(-1) > 0)
    kept = linear_cross_entropy(hidden[15:], weight, targets[15:], chunk_size=8)
    torch.testing.assert_close(loss, kept.detach(), rtol=0, atol=1e-6)
    custom = targets.masked_fill(targets == 5, 6)  # a real class id as the ignore index
    custom[:15] = 5
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, custom, ignore_index=5).detach(),
                               F.cross_entropy(hidden @ weight.T, custom, ignore_index=5).detach(),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("skip_ignored", [False, True])
def test_all_targets_ignored_is_zero_loss_and_zero_grads(skip_ignored):
    hidden, weight, bias, targets = problem(shape=(2, 9), with_bias=True)
    targets.fill_(IGNORE_INDEX)
    loss, grads = loss_and_grads(fused(4, skip_ignored), hidden, weight, bias, targets)
    assert loss.item() == 0.0
    for (g, t) in zip(grads, (hidden, weight, bias)):
        assert g.shape == t.shape and torch.isfinite(g).all() and torch.all(g == 0)


def test_skip_ignored_runs_the_head_on_the_counted_rows_only(monkeypatch):
    hidden, weight, _, targets = problem(shape=(64,), ignored=40)
    rows_seen = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, *a, **k: rows_seen.append(x.shape[0]) or linear(x, *a, **k))
    linear_cross_entropy(hidden, weight, targets, skip_ignored=True)
    assert rows_seen == [24]


def test_the_default_chunk_keeps_one_logits_block_near_128_mib():
    from lmforge.train.fused_ce import auto_chunk_size

    assert auto_chunk_size(32_000) == 1024 and auto_chunk_size(151_936) == 220 and auto_chunk_size(10**9) == 16


def test_hidden_without_grad_and_non_contiguous_hidden():
    hidden, weight, _, targets = problem(shape=(50, 3))
    hidden = hidden.detach().transpose(0, 1)  # [3, 50, D], not contiguous
    assert not hidden.is_contiguous()
    targets = targets.T
    (ref_dw,) = torch.autograd.grad(reference(hidden, weight, None, targets), weight)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=32)
    (dw,) = torch.autograd.grad(loss, weight)
    torch.testing.assert_close(dw, ref_dw, rtol=0, atol=1e-5)
    with torch.no_grad():  # evaluation: a value, no graph
        value = linear_cross_entropy(hidden, weight, targets)
    assert not value.requires_grad
    torch.testing.assert_close(value, reference(hidden, weight, None, targets).detach(), rtol=0, atol=1e-5)


def test_grads_scale_with_grad_output_and_accumulate():
    hidden, weight, _, targets = problem()
    (2.5 * linear_cross_entropy(hidden, weight, targets, chunk_size=16)).backward()
    (0.5 * reference(hidden, weight, None, targets)).backward()  # adds onto the same .grad
    dh, dw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (3.0 * reference(hidden, weight, None, targets)).backward()
    torch.testing.assert_close(dh, hidden.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(dw, weight.grad, rtol=0, atol=1e-5)


def tiny_model(**overrides) -> Transformer:
    return debug_model(61, 0, max_seq_len=16, **overrides).train()


@pytest.mark.parametrize("tied", [True, False])
def test_trainer_lm_loss_gives_every_parameter_the_reference_gradient(tied):
    """Through a whole model, incl. an LM head tied to the input embedding (two paths into one Parameter)."""
    model = tiny_model(tie_embeddings=tied)
    assert (model.lm_head.weight is model.embed.weight) == tied
    ids = torch.randint(0, 61, (3, 17), generator=torch.Generator().manual_seed(1))
    batch = ids[:, :-1], ids[:, 1:]
    params = dict(model.named_parameters())
    ref, _ = lm_loss_unfused(model, batch)
    ref_grads = torch.autograd.grad(ref, list(params.values()))
    loss, _ = lm_loss(model, batch)
    grads = torch.autograd.grad(loss, list(params.values()))
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    for name, g, r in zip(params, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_training_compiles_the_trunk_that_lm_loss_calls(tmp_path, monkeypatch):
    """train.compile must not leave lm_loss's `hidden_states` eager (torch.compile compiles only forward)."""
    output_widths = []

    def recording_backend(gm, example_inputs):  # runs the captured graph as is, noting its output's width
        def run(*args):
            outputs = gm.forward(*args)
            output_widths.append(outputs[0].shape[-1])
            return outputs
        return run

    monkeypatch.setattr(trainer, "compile_model", lambda m: torch.compile(m, backend=recording_backend))
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    batches = RepeatedBatch((ids[:, :-1], ids[:, 1:]))
    cfg = dict(steps=3, lr=1e-2, warmup_steps=1, precision="fp32", device="cpu", eval_every=0, save_every=0,
               plot_every=0, log_every=1)
    eager = train_loop(tiny_model(), lm_loss, batches, from_dict(TrainConfig, cfg), tmp_path / "eager")
    compiled = train_loop(tiny_model(), lm_loss, batches, from_dict(TrainConfig, {**cfg, "compile": True}),
                          tmp_path / "compiled")
    model_cfg = tiny_model().cfg
    assert output_widths, "the training step ran eagerly"
    assert set(output_widths) == {model_cfg.d_model}  # hidden states, not [.., vocab] logits
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], abs=1e-5)


def test_pretrain_fused_and_unfused_train_the_same_model(tmp_path):
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "data" / "train", 61) as writer:
        for _ in range(8):
            writer.add(rng.integers(0, 61, 300), n_bytes=600)
    runs = {}
    for fused in (True, False):
        cfg = from_dict(PretrainConfig, {
            "run_dir": str(tmp_path / f"run-{fused}"), "data": {"path": str(tmp_path / "data"), "seq_len": 16,
                                                                "batch_size": 4},
            "model": {"preset": "debug", "max_seq_len": 16},
            "train": {"steps": 3, "precision": "fp32", "device": "cpu", "fused_ce": fused, "save_every": 0,
                      "plot_every": 0, "eval_every": 0}})
        runs[fused] = pretrain(cfg)
    assert runs[True]["final_loss"] == pytest.approx(runs[False]["final_loss"], abs=1e-5)
    fused_model, plain_model = (load_model(runs[f]["model_dir"]) for f in (True, False))
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_bf16_autocast_is_close_to_the_reference(device):
    hidden, weight, bias, targets = (t.detach().to(device).requires_grad_(t.requires_grad)
                                     for t in problem(shape=(4, 64), with_bias=True))
    ref_loss, ref_grads = loss_and_grads(reference, hidden, weight, bias, targets)  # fp32
    with torch.autocast(device, dtype=torch.bfloat16):
        amp_ref = reference(hidden, weight, bias, targets)
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=48, bias=bias)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    amp_grads = torch.autograd.grad(amp_ref, (hidden, weight, bias))
    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32] * 3  # fp32 master weights keep fp32 grads
    assert loss.item() != ref_loss.item()  # the head really ran in bf16 ...
    torch.testing.assert_close(loss, amp_ref.detach(), rtol=0, atol=2e-3)  # ... like autocast's linear
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=3e-2)
    for g, amp, ref in zip(grads, amp_grads, ref_grads):
        scale = ref.abs().max()
        torch.testing.assert_close(g, amp, rtol=0, atol=2e-2 * scale)
        torch.testing.assert_close(g, ref, rtol=0, atol=3e-2 * scale)


def test_shape_mismatch_is_an_error():
    hidden, weight, _, targets = problem()
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(hidden, weight, targets[:, :-1])
    with pytest.raises(ValueError, match="vocab"):
        linear_cross_entropy(hidden, weight.T, targets)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)
