import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.core.config import from_dict
from lmforge.data.shards import ShardWriter
from lmforge.model import ModelConfig, Transformer, load_model
from lmforge.model.mtp import draft_logits, mtp_loss
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import PretrainConfig, lm_loss, pretrain

VOCAB = 64


def mtp_model(depth: int = 2, **overrides) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, mtp_depth=depth,
                mtp_loss_weight=0.5)
    return Transformer(ModelConfig(**{**base, **overrides}))


def test_mtp_loss_is_lambda_times_mean_depth_cross_entropy():
    model = mtp_model(depth=2)
    x = torch.randint(0, VOCAB, (2, 10))
    targets = torch.randint(0, VOCAB, (2, 10))
    hidden = model(x, return_hidden=True)
    # by hand, eq. 21-25: depth k combines h^{k-1}_i with Emb(t_{i+k}) = Emb(targets[i + k - 1])
    expected, h = [], hidden
    for k, mod in enumerate(model.mtp.layers, start=1):
        L = 10 - k + 1
        x_k = mod.proj(torch.cat([mod.enorm(model.embed(targets[:, k - 1:])), mod.hnorm(h[:, :L])], -1))
        h = mod.block(x_k, model.rope(torch.arange(L)), None, 0, None)
        logits = model.lm_head(mod.norm(h))[:, : 10 - k]
        expected.append(F.cross_entropy(logits.flatten(0, 1), targets[:, k:].flatten()))
    torch.testing.assert_close(mtp_loss(model, hidden, targets), 0.5 * (expected[0] + expected[1]) / 2)


def test_mtp_keeps_the_causal_chain():
    """Depth k at position i may see tokens up to t_{i+k} only: changing later targets leaves it unchanged."""
    model = mtp_model(depth=2).eval()
    x = torch.randint(0, VOCAB, (1, 12))
    t = torch.randint(0, VOCAB, (1, 12))
    t2 = t.clone()
    t2[0, 6:] = (t2[0, 6:] + 1) % VOCAB
    with torch.no_grad():
        h = model(x, return_hidden=True)
        a, b = draft_logits(model, h, t), draft_logits(model, h, t2)
    assert [d.shape for d in a] == [(1, 12, VOCAB), (1, 11, VOCAB)]
    torch.testing.assert_close(a[0][:, :6], b[0][:, :6])  # depth 1 at i uses t[..i]
    torch.testing.assert_close(a[1][:, :5], b[1][:, :5])  # depth 2 at i uses t[..i+1]
    assert not torch.allclose(a[0][:, 6], b[0][:, 6])


def test_plain_models_keep_lm_loss_unchanged():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))
    x, y = torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (2, 9))
    loss, metrics = lm_loss(model, (x, y))
    assert metrics == {} and model.aux_losses() == {}
    torch.testing.assert_close(loss, F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    mtp = mtp_model(depth=1)
    loss, metrics = lm_loss(mtp, (x, y))
    assert set(metrics) == {"lm_loss", "mtp_loss"}
    assert loss.item() == pytest.approx(metrics["lm_loss"] + metrics["mtp_loss"], rel=1e-5)


def write_shards(directory, n_tokens: int = 6000) -> None:
    rng = np.random.default_rng(0)
    stream = np.resize(rng.integers(0, VOCAB, 40), n_tokens)
    with ShardWriter(directory, VOCAB, max_shard_tokens=2000) as w:
        for doc in np.array_split(stream, 10):
            w.add(doc, n_bytes=2 * len(doc))


@pytest.mark.slow
def test_pretrain_deepseek_style_model_logs_aux_losses_and_balance(tmp_path):
    """MLA + DeepSeekMoE + MTP through `pretrain`: the loss falls, the MTP/balance losses and the expert
    utilization are logged, router biases move, and the saved model reloads."""
    write_shards(tmp_path / "shards" / "train")
    model = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=32, attention="mla", kv_lora_rank=16,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, moe_experts=8, moe_top_k=2, moe_d_ff=16,
                 moe_shared_experts=1, moe_router="sigmoid", moe_norm_top_k=True, moe_groups=4, moe_top_groups=2,
                 moe_bias_update_rate=0.01, moe_seq_aux_weight=0.001, moe_first_dense=1, mtp_depth=1)
    train = dict(steps=30, lr=3e-3, warmup_steps=2, precision="fp32", device="cpu", log_every=5, eval_every=0,
                 save_every=0, plot_every=0)
    cfg = from_dict(PretrainConfig, {"run_dir": str(tmp_path / "run"), "model": model, "train": train,
                                     "data": {"path": str(tmp_path / "shards"), "seq_len": 24, "batch_size": 4}})
    out = pretrain(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    keys = set(rows[-1])
    assert {"mtp_loss", "moe_aux_loss", "lm_loss", "moe_load_max_min", "moe_load_max_mean"} <= keys
    assert all(r["moe_load_max_mean"] >= 1.0 for r in rows)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["lm_loss"] + rows[-1]["mtp_loss"] + rows[-1]["moe_aux_loss"],
                                             rel=1e-4)
    reloaded = load_model(out["model_dir"])
    assert reloaded.blocks[1].mlp.router.bias.abs().sum() > 0  # the balancer's bias is saved with the model
