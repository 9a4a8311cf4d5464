import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import Crash, CrashAfter, RepeatedBatch, learnable_shards
from textdata import SHAKESPEARE
from tinymodels import debug_model

from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.data.loader import SequenceLoader
from lmforge.data.shards import ShardWriter
from lmforge.model import Transformer, load_model
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import PretrainConfig, lm_loss, pretrain
from lmforge.train.trainer import forward_backward, train_loop
from recipes import loop_config as train_cfg

VOCAB = 64


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    return debug_model(VOCAB, seed, max_seq_len=32, **overrides)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_loss_decreases_on_a_repeated_batch(tmp_path):
    ids = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(0))
    batches = RepeatedBatch((ids[:, :-1], ids[:, 1:]))
    result = train_loop(tiny_model(), lm_loss, batches, train_cfg(steps=20, lr=1e-2), tmp_path)
    curve = [loss for _, loss in losses(tmp_path)]
    assert len(curve) == 20 and batches.served == 20
    assert curve[0] > 3.5  # ~ln(64) at init
    assert curve[-1] < 0.5 * curve[0]
    assert result["final_loss"] == pytest.approx(curve[-1]) and result["steps"] == 20


def test_grad_accum_matches_a_batch_twice_as_large():
    ids = torch.randint(0, VOCAB, (8, 17), generator=torch.Generator().manual_seed(1))
    full = (ids[:, :-1], ids[:, 1:])
    halves = iter([(ids[:4, :-1], ids[:4, 1:]), (ids[4:, :-1], ids[4:, 1:])])

    class Halves(RepeatedBatch):
        def next_batch(self):
            return next(halves)

    grads = []
    stats = []
    for batches, accum in ((RepeatedBatch(full), 1), (Halves(None), 2)):
        model = tiny_model(3)
        stats.append(forward_backward(model, lm_loss, batches, accum, torch.device("cpu"), "fp32"))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert stats[0].loss == pytest.approx(stats[1].loss, rel=1e-6)
    assert stats[0].tokens == stats[1].tokens == 8 * 16
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_exact_resume_repeats_the_uninterrupted_run(tmp_path):
    shards = learnable_shards(tmp_path / "data", n_docs=20, bytes_per_token=2)
    # dropout on and a shuffled loader: resume must restore RNG and data order, not just weights
    cfg = train_cfg(steps=8, grad_accum=2, save_every=2, keep_checkpoints=1)

    def run(run_dir, crash_after=None, resume=False, seed=0):
        loader = SequenceLoader(shards, batch_size=3, seq_len=16, seed=5)
        batches = loader if crash_after is None else CrashAfter(loader, crash_after)
        model = tiny_model(seed, dropout=0.1)
        return model, train_loop(model, lm_loss, batches, cfg, run_dir, resume=resume)

    full_model, _ = run(tmp_path / "full")
    with pytest.raises(Crash):  # dies fetching step 6's batches: steps 1-5 logged, checkpoint at 4
        run(tmp_path / "resumed", crash_after=5 * 2)
    assert [s for s, _ in losses(tmp_path / "resumed")] == [1, 2, 3, 4, 5]
    resumed_model, result = run(tmp_path / "resumed", resume=True, seed=99)  # different init: overwritten

    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert [s for s, _ in resumed] == list(range(1, 9))  # step 5's row was logged again, not duplicated
    for (_, a), (_, b) in zip(full, resumed):
        assert abs(a - b) <= 1e-6
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert result["tokens_seen"] == 8 * 2 * 3 * 16


def test_bf16_run_on_cpu(tmp_path):
    shards = learnable_shards(tmp_path / "data", n_docs=20, bytes_per_token=2)
    model = tiny_model()
    result = train_loop(model, lm_loss, SequenceLoader(shards, 4, 16), train_cfg(steps=6, precision="bf16"),
                        tmp_path / "run")
    assert np.isfinite(result["final_loss"]) and result["final_loss"] < 4.5
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_diverged_loss_is_a_one_line_error(tmp_path):
    ids = torch.randint(0, VOCAB, (2, 9))

    def nan_loss(model, batch):
        loss, _ = lm_loss(model, batch)
        return loss * float("nan"), {}

    with pytest.raises(LmforgeError, match="step 1: loss is nan"):
        train_loop(tiny_model(), nan_loss, RepeatedBatch((ids[:, :-1], ids[:, 1:])), train_cfg(), tmp_path)


def test_metrics_rows_and_malformed_file(tmp_path):
    ids = torch.randint(0, VOCAB, (2, 9))

    def loss_with_metric(model, batch):
        loss, _ = lm_loss(model, batch)
        return loss, {"acc": torch.tensor(0.25)}

    train_loop(tiny_model(), loss_with_metric, RepeatedBatch((ids[:, :-1], ids[:, 1:])),
               train_cfg(steps=5, log_every=2), tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 5]
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "acc"}
    assert rows[0]["acc"] == pytest.approx(0.25) and rows[-1]["tokens_seen"] == 5 * 16
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss"\n')
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2:"):
        read_metrics(tmp_path / "bad.jsonl")


# ----------------------------------------------------------------------------------------------
# pretrain / `lmforge pretrain`


@pytest.fixture(scope="module")
def shakespeare_data(tmp_path_factory) -> Path:
    """DATA/ as `lmforge data tokenize` lays it out: tokenizer.json, train/ and val/ shards."""
    if not SHAKESPEARE.is_file():
        pytest.skip("tinyshakespeare.txt not available")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = tmp_path_factory.mktemp("data")
    tok.save(str(data / "tokenizer.json"))
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    eos = tok.token_to_id("<|endoftext|>")
    for split, docs in (("train", paragraphs[:-20]), ("val", paragraphs[-20:])):
        with ShardWriter(data / split, tok.get_vocab_size(), eos_id=eos) as w:
            for doc in docs:
                w.add(tok.encode(doc).ids + [eos], n_bytes=len(doc.encode()))
    return data


PRETRAIN_FLAGS = ["--model.preset", "debug", "--data.seq_len", "32", "--data.batch_size", "4",
                  "--train.steps", "6", "--train.log_every", "2", "--train.eval_every", "3",
                  "--train.eval_batches", "2", "--train.save_every", "3", "--train.plot_every", "3",
                  "--train.precision", "fp32"]


def test_cli_pretrain_writes_a_usable_run(shakespeare_data, tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--run_dir", str(run), "--data.path", str(shakespeare_data), *PRETRAIN_FLAGS]
    assert main(["pretrain", *flags]) == 0
    out = capsys.readouterr().out
    assert "pretrain: 6 steps, final loss" in out and "val bpb" in out

    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 300 and saved["train"]["steps"] == 6  # vocab from the shards
    model = load_model(run / "model")
    assert model.cfg.vocab_size == 300
    assert (run / "model/tokenizer.json").read_bytes() == (shakespeare_data / "tokenizer.json").read_bytes()
    assert (run / "loss.png").stat().st_size > 1000
    assert list((run / "tb").glob("events.out.tfevents.*"))
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [3, 6] and all(r["val_bpb"] > 0 for r in val)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000006"

    # the same run dir again without --resume would silently mix two runs: refuse
    assert main(["pretrain", *flags]) == 1
    assert "--resume true" in capsys.readouterr().err
    # a checkpoint of another architecture: one line naming the key
    assert main(["pretrain", *flags, "--resume", "true", "--model.n_layers", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(err) and err[-1].startswith("lmforge: error: ")
    assert "model.n_layers=2" in err[-1] and "model.n_layers=3" in err[-1]


def test_resume_without_checkpoint_starts_fresh(shakespeare_data, tmp_path, capsys):
    cfg = from_dict(PretrainConfig, {"run_dir": str(tmp_path / "run"), "resume": True,
                                     "model": {"preset": "debug"},
                                     "data": {"path": str(shakespeare_data), "seq_len": 16, "batch_size": 2},
                                     "train": {"steps": 2, "precision": "fp32", "eval_batches": 1}})
    result = pretrain(cfg)
    assert "no checkpoint" in capsys.readouterr().err
    assert result["steps"] == 2 and result["val_loss"] is not None
    assert Path(result["model_dir"], "model.safetensors").is_file()


def test_vocab_larger_than_model_is_an_error(shakespeare_data, tmp_path):
    cfg = from_dict(PretrainConfig, {"run_dir": str(tmp_path / "run"),
                                     "model": {"preset": "debug", "vocab_size": 100},
                                     "data": {"path": str(shakespeare_data), "seq_len": 16}})
    with pytest.raises(LmforgeError, match="model.vocab_size 100 is smaller than the vocab_size 300"):
        pretrain(cfg)


def test_missing_data_is_an_error(tmp_path):
    cfg = from_dict(PretrainConfig, {"run_dir": str(tmp_path / "run"),
                                     "data": {"path": str(tmp_path / "nope")}})
    with pytest.raises(LmforgeError, match="no token shards"):
        pretrain(cfg)
