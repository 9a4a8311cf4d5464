"""Nothing executed from a run directory, nothing lost: directory locks, pickle-free work files and checkpoint
reads, non-finite gradients and weights, a missing `latest`, checksums, and resume geometry (issue 17)."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fakes import RepeatedBatch as FixedBatches
from fakes import learnable_shards
from tinymodels import debug_model

from lmforge.checkpoint.dcp import load_any_checkpoint, load_dcp_checkpoint, save_dcp_checkpoint
from lmforge.checkpoint.store import LATEST_NAME, checkpoints_dir, load_checkpoint, save_checkpoint
from lmforge.cli import main
from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.data.pipeline import clean_documents
from lmforge.model import load_model
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import PretrainConfig, lm_loss, pretrain
from lmforge.train.trainer import train_loop
from recipes import loop_config as train_cfg

# Another process owning DIR: an exclusive flock on DIR/.lock holding its pid, until its stdin closes.
HOLDER = ("import fcntl, os, sys\n"
          "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
          "fcntl.flock(fd, fcntl.LOCK_EX)\n"
          "os.ftruncate(fd, 0); os.write(fd, f'{os.getpid()}\\n'.encode())\n"
          "print('locked', flush=True)\n"
          "sys.stdin.read()\n")


@contextmanager
def held(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory / ".lock")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lmforge: error:")]
    assert len(lines) == 1, err
    return lines[0]


class Evil:
    """A pickle that creates `canary` when loaded."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return open, (str(self.canary), "w")


def plant(path: Path, canary: Path) -> None:
    path.write_bytes(pickle.dumps(Evil(canary)))


# ----------------------------------------------------------------------------------------------
# one owner per directory


def test_dir_lock_refuses_a_second_owner_and_takes_over_a_dead_ones(tmp_path, capsys):
    from lmforge.core.files import dir_lock

    run = tmp_path / "run"
    with held(run) as owner:
        with pytest.raises(LmforgeError) as err:
            with dir_lock(run):
                pass
        assert f"pid {owner.pid}" in str(err.value) and "in use" in str(err.value) and "\n" not in str(err.value)
        os.kill(owner.pid, signal.SIGKILL)  # dies holding it: the kernel releases the flock, the pid stays
        owner.wait()
        with dir_lock(run):
            assert (run / ".lock").read_text().strip() == str(os.getpid())
            with dir_lock(run):  # the same process may nest it
                pass
        assert f"taking over the lock of pid {owner.pid}" in capsys.readouterr().err
        assert (run / ".lock").read_text() == ""  # released cleanly


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 2-step pretraining run (checkpoint at the end) on tiny shards."""
    root = tmp_path_factory.mktemp("pretrain")
    write_shards(root / "shards" / "train")
    pretrain(pretrain_cfg(root, root / "run"))
    return root


VOCAB = 64


def tiny_model(seed: int = 0, **overrides):
    return debug_model(VOCAB, seed, max_seq_len=32, **overrides)


def write_shards(directory: Path) -> None:
    learnable_shards(directory, vocab=VOCAB, n_docs=20, bytes_per_token=2)


def pretrain_cfg(root: Path, run: Path, **data) -> PretrainConfig:
    return from_dict(PretrainConfig, {
        "run_dir": str(run), "model": {"preset": "debug", "max_seq_len": 32},
        "data": {"path": str(root / "shards"), "seq_len": 16, "batch_size": 2, **data},
        "train": {"steps": 2, "lr": 1e-3, "warmup_steps": 1, "precision": "fp32", "device": "cpu",
                  "plot_every": 0}})


def test_pretrain_refuses_a_run_dir_another_process_owns(pretrained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pretrained / "run", run)
    metrics = (run / "metrics.jsonl").read_bytes()
    with held(run) as owner:
        flags = ["--run_dir", str(run), "--data.path", str(pretrained / "shards"), "--model.preset", "debug",
                 "--model.max_seq_len", "32", "--data.seq_len", "16", "--data.batch_size", "2", "--train.steps",
                 "4", "--train.precision", "fp32", "--train.device", "cpu", "--resume", "true"]
        assert main(["pretrain", *flags]) == 1
        line = one_error_line(capsys)
        assert "in use by another process" in line and f"pid {owner.pid}" in line
    assert (run / "metrics.jsonl").read_bytes() == metrics  # the owner's files are untouched


def test_data_clean_tokenize_and_tokenizer_train_refuse_a_locked_output(tmp_path, capsys):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    with held(out):
        assert main(["data", "clean", "--input", str(corpus), "--output", str(out), "--steps", "exact_dedup",
                     "--workers", "1"]) == 1
        assert "in use by another process" in one_error_line(capsys)
        assert main(["tokenizer", "train", "--input", str(corpus), "--output", str(out),
                     "--vocab_size", "300"]) == 1
        assert "in use by another process" in one_error_line(capsys)
        assert main(["tokenizer", "train", "--input", str(corpus), "--output", str(tmp_path / "tok"),
                     "--vocab_size", "300"]) == 0
        capsys.readouterr()
        assert main(["data", "tokenize", "--input", str(corpus), "--tokenizer", str(tmp_path / "tok"),
                     "--output", str(out)]) == 1
        assert "in use by another process" in one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written into the owned directory


# ----------------------------------------------------------------------------------------------
# no pickle from a run directory


def test_data_clean_rerun_never_unpickles_its_work_files(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"text {i % 5} " * 10}) + "\n" for i in range(20)))
    out = tmp_path / "out"
    stats = clean_documents([corpus], out, steps=["exact_dedup"], workers=1, progress=False)
    assert stats["docs_kept"] == 5
    work = sorted((out / ".work").rglob("*.keys.*"))
    assert work and not list((out / ".work").rglob("*.pkl"))
    canary = tmp_path / "pwned"
    for path in work:  # a rerun resolves the barrier again from these files
        plant(path, canary)
    try:
        clean_documents([corpus], out, steps=["exact_dedup"], workers=1, progress=False)
    except LmforgeError as e:
        assert "\n" not in str(e)
    assert not canary.exists()


def test_barrier_keys_round_trip_without_pickle(tmp_path):
    from lmforge.data.pipeline import load_keys, save_keys

    big = 2**128 - 3
    cases = [[big, 0, 7], [torch.arange(5).numpy().astype("uint64"), torch.arange(0).numpy().astype("uint64")],
             [[1, 2**64 - 1], []], []]
    for i, keys in enumerate(cases):
        ids = [f"doc-{j}" for j in range(len(keys))]
        save_keys(tmp_path / f"{i}.keys.npz", keys, ids)
        loaded, loaded_ids = load_keys(tmp_path / f"{i}.keys.npz")
        assert loaded_ids == ids
        assert [k.tolist() if hasattr(k, "tolist") else k for k in loaded] == [
            k.tolist() if hasattr(k, "tolist") else k for k in keys]


def saved_run(tmp_path: Path, steps=(1,)) -> tuple[Path, torch.nn.Module]:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in steps:
        with torch.no_grad():
            model.embed.weight[0, 0] = step  # each checkpoint recognizable
        save_checkpoint(tmp_path / "run", step, model, opt, {"marker": step}, keep=0)
    return tmp_path / "run", model


def test_a_planted_dcp_metadata_file_is_never_unpickled(tmp_path):
    run, model = saved_run(tmp_path)
    canary = tmp_path / "pwned"
    plant(checkpoints_dir(run) / "step_000001" / ".metadata", canary)
    other = tiny_model(seed=1)
    try:
        state = load_any_checkpoint(run, other, torch.optim.AdamW(other.parameters()))
    except Exception:  # noqa: BLE001 - today's code unpickles it, then fails: the canary tells
        state = None
    assert not canary.exists()
    assert state is not None and state["marker"] == 1 and torch.equal(other.embed.weight, model.embed.weight)


def test_a_forged_dcp_checkpoint_runs_no_code(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    run = tmp_path / "run"
    path = save_dcp_checkpoint(run, 1, model, opt, {"marker": 1}, keep=1, model_cfg=model.cfg)
    other = tiny_model(seed=1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    assert load_dcp_checkpoint(run, other, other_opt)["marker"] == 1  # the honest one loads, weights and Adam
    assert torch.equal(other.embed.weight, model.embed.weight)
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    canary = tmp_path / "pwned"
    plant(path / ".metadata", canary)
    sums = path / "checksums.json"
    if sums.is_file():  # a forger rewrites the recorded digest too
        from lmforge.core.files import file_sha256

        data = json.loads(sums.read_text())
        data["sha256"][".metadata"] = file_sha256(path / ".metadata")
        sums.write_text(json.dumps(data))
    error = None
    try:
        load_dcp_checkpoint(run, other, other_opt)
    except Exception as e:  # noqa: BLE001
        error = e
    assert not canary.exists()
    assert isinstance(error, LmforgeError) and ".metadata" in str(error)


def test_a_dcp_checkpoint_without_a_recorded_format_is_not_unpickled(tmp_path):
    """What an older lmforge saved (no "format", no checksums) or a forger wrote: the .metadata stays unread."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    path = save_dcp_checkpoint(tmp_path / "run", 1, model, opt, {}, keep=1, model_cfg=model.cfg)
    state = json.loads((path / "trainer_state.json").read_text())
    state.pop("format", None)
    (path / "trainer_state.json").write_text(json.dumps(state))
    (path / "checksums.json").unlink(missing_ok=True)
    canary = tmp_path / "pwned"
    plant(path / ".metadata", canary)
    error = None
    try:
        load_any_checkpoint(tmp_path / "run", model, opt)
    except Exception as e:  # noqa: BLE001
        error = e
    assert not canary.exists()
    assert isinstance(error, LmforgeError) and "not loaded" in str(error)


# ----------------------------------------------------------------------------------------------
# non-finite gradients and weights


def test_a_non_finite_gradient_with_a_finite_loss_skips_the_step(tmp_path):
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        loss, metrics = lm_loss(model, batch)
        if calls[0] == 3:  # sqrt'(0) = inf: the loss stays finite, the gradient does not
            w = model.norm.weight
            loss = loss + torch.sqrt(w - w.detach()).sum()
        return loss, metrics

    snapshots = {}

    def snapshot(model, step):
        snapshots[step] = [p.detach().clone() for p in model.parameters()]
        return {}

    model = tiny_model()
    batch = (torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16)))
    result = train_loop(model, loss_fn, FixedBatches(batch), train_cfg(steps=4, save_every=2),
                        tmp_path / "run", on_step_end=[snapshot])
    assert result["steps"] == 4
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))  # step 3 changed nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = load_model(checkpoints_dir(tmp_path / "run") / "step_000004")
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[2]["grad_norm"] is None and rows[-1]["skipped_steps"] == 1


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    run, model = saved_run(tmp_path)
    with torch.no_grad():
        model.embed.weight[1, 1] = float("nan")
    with pytest.raises(LmforgeError, match="NaN or inf") as err:
        save_checkpoint(run, 2, model, torch.optim.AdamW(model.parameters()), {}, keep=0)
    assert "step_000001 stays the latest" in str(err.value)
    assert (checkpoints_dir(run) / LATEST_NAME).read_text().strip() == "step_000001"
    assert not (checkpoints_dir(run) / "step_000002").exists()


# ----------------------------------------------------------------------------------------------
# latest, checksums, resume geometry


def test_without_latest_resume_continues_from_the_newest_complete_step(tmp_path, capsys):
    model = tiny_model()
    batch = (torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16)))
    run = tmp_path / "run"
    train_loop(model, lm_loss, FixedBatches(batch), train_cfg(steps=2, save_every=1, keep_checkpoints=0), run)
    before = read_metrics(run / "metrics.jsonl")
    (checkpoints_dir(run) / LATEST_NAME).unlink()

    with pytest.raises(LmforgeError, match="already holds checkpoints"):  # a fresh run would delete them
        train_loop(tiny_model(), lm_loss, FixedBatches(batch), train_cfg(steps=3), run)
    assert read_metrics(run / "metrics.jsonl") == before
    result = train_loop(tiny_model(), lm_loss, FixedBatches(batch),
                        train_cfg(steps=3, save_every=1, keep_checkpoints=0), run, resume=True)
    assert "newest complete checkpoint, step_000002" in capsys.readouterr().err
    rows = read_metrics(run / "metrics.jsonl")
    assert result["steps"] == 3 and rows[:2] == before and [r["step"] for r in rows] == [1, 2, 3]


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    run, _ = saved_run(tmp_path, steps=(1, 2))
    weights = checkpoints_dir(run) / "step_000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40  # one bit flipped in the tensor data: still a valid safetensors file
    weights.write_bytes(bytes(data))

    model = tiny_model(seed=1)
    state = load_checkpoint(run, model, None)
    assert state["marker"] == 1 and model.embed.weight[0, 0].item() == 1
    err = capsys.readouterr().err
    assert "step_000002 is damaged" in err and "falling back to step_000001" in err

    (checkpoints_dir(run) / "step_000001" / "trainer_state.json").write_text("{}")
    with pytest.raises(LmforgeError, match="no intact checkpoint"):
        load_checkpoint(run, model, None)


@pytest.mark.parametrize("key, value", [("batch_size", 4), ("seq_len", 8)])
def test_resume_with_another_batch_geometry_is_refused(pretrained, tmp_path, key, value):
    run = tmp_path / "run"
    shutil.copytree(pretrained / "run", run)
    cfg = pretrain_cfg(pretrained, run, **{key: value})
    cfg.resume, cfg.train.steps = True, 4
    metrics = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(LmforgeError) as err:
        pretrain(cfg)
    msg = str(err.value)
    assert f"data.{key}={value}" in msg and "\n" not in msg
    assert (run / "metrics.jsonl").read_bytes() == metrics  # nothing trained, nothing lost
