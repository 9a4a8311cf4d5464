"""Issue 17, "clean errors everywhere": bad input and a hostile machine give one line naming the option or the
file and a non-zero exit, never a traceback; output files follow the umask; `data clean` says what it could not
read, keeps the input file:line of every reject, and its pool workers die with it."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import learnable_shards
from safetensors import SafetensorError

from lmforge.cli import main
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_text
from lmforge.core.runtime import resolve_device
from lmforge.data.writers import JsonlWriter

TINY = ["--model.preset", "debug", "--data.seq_len", "16", "--data.batch_size", "2", "--train.steps", "2",
        "--train.precision", "fp32", "--train.plot_every", "0", "--train.eval_every", "0"]


def one_line_error(capsys, *needles: str) -> str:
    """The command's stderr ends in one 'lmforge: error:' line holding every needle, with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lmforge: error: "), err
    for needle in needles:
        assert needle in last, last
    return last


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    learnable_shards(data / "train", 64, 2000, 1000)
    return data


def pretrain(shards: Path, run_dir: Path, *flags: str) -> int:
    return main(["pretrain", "--run_dir", str(run_dir), "--data.path", str(shards), *TINY, *flags])


# ----------------------------------------------------------------------------------------------
# one line naming the option or the file


def test_unknown_device_names_the_option(capsys):
    assert main(["pretrain", "--train.device", "tpu9"]) == 2
    one_line_error(capsys, "train.device", "'tpu9'")
    with pytest.raises(LmforgeError, match=r"^device must be .*'tpu9'"):
        resolve_device("tpu9")


def test_run_dir_that_is_a_file(shards, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    assert pretrain(shards, afile) == 1
    one_line_error(capsys, "run_dir", str(afile), "not a directory")
    assert pretrain(shards, afile / "run") == 1  # a path through a file
    one_line_error(capsys, "run_dir", str(afile / "run"))
    assert afile.read_text() == "not a directory"


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a /sys nobody may create directories in")
def test_run_dir_the_os_refuses(shards, capsys):
    assert pretrain(shards, Path("/sys/lmforge-test-run")) == 1
    one_line_error(capsys, "run_dir", "/sys/lmforge-test-run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_run_dir_not_writable(shards, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert pretrain(shards, locked) == 1
    one_line_error(capsys, "run_dir", "cannot write")


def test_serve_port_out_of_range_or_taken(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "none"), "--port", "99999"]) == 2
    one_line_error(capsys, "port", "99999")
    with socket.socket() as taken:  # refused before the model is even loaded
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(tmp_path / "none"), "--port", str(port)]) == 1
    one_line_error(capsys, f"port {port}", "in use")


def test_num_beams_zero_is_refused(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--num-beams", "0"]) == 2
    one_line_error(capsys, "num_beams", "0")


def test_clean_output_that_is_a_file(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    out = tmp_path / "out"
    out.write_text("precious")
    assert main(["data", "clean", "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
                 "--steps", "exact_dedup", "--workers", "1"]) == 1
    one_line_error(capsys, "output", str(out))
    assert out.read_text() == "precious"


def test_trainer_state_without_optimizer(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(shards, run) == 0
    state_file = run / "checkpoints" / "step_000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["optimizer"]
    state_file.write_text(json.dumps(state))
    sums = state_file.parent / "checksums.json"
    if sums.is_file():  # a checkpoint with digests: a writer that left the key out would have recorded this file's
        recorded = json.loads(sums.read_text())
        recorded["sha256"][state_file.name] = hashlib.sha256(state_file.read_bytes()).hexdigest()
        sums.write_text(json.dumps(recorded))
    assert pretrain(shards, run, "--resume", "true", "--train.steps", "4") == 1
    one_line_error(capsys, str(state_file), "'optimizer'")


@pytest.mark.parametrize("failure", [
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                    '"No space left on device" })'),
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "optimizer.safetensors"),
])
def test_disk_full_while_writing_a_checkpoint(shards, tmp_path, capsys, monkeypatch, failure):
    import lmforge.checkpoint.store as store

    def full_disk(*args, **kwargs):
        raise failure

    monkeypatch.setattr(store, "save_file", full_disk)
    run = tmp_path / "run"
    assert pretrain(shards, run) == 1
    one_line_error(capsys, str(run / "checkpoints" / "step_000002"), os.strerror(errno.ENOSPC))
    assert [p.name for p in (run / "checkpoints").iterdir()] == []  # no half checkpoint left behind


# ----------------------------------------------------------------------------------------------
# output files follow the umask


def test_output_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        writer = JsonlWriter(tmp_path / "kept.jsonl")
        writer.write({"text": "x"})
        writer.commit()
        os.umask(0o027)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "kept.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640


def test_checkpoint_directory_follows_the_umask(tmp_path):
    import torch

    from lmforge.checkpoint.store import save_checkpoint
    from lmforge.core.config import from_dict
    from lmforge.model import ModelConfig, Transformer

    model = Transformer(from_dict(ModelConfig, {"preset": "debug", "vocab_size": 32, "max_seq_len": 16}))
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path, 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {}, keep=0)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in path.iterdir())


# ----------------------------------------------------------------------------------------------
# data clean: what could not be read, where rejects came from, workers that die with the run


def docs(prefix: str, n: int) -> str:
    return "".join(json.dumps({"id": f"{prefix}{i}", "text": f"document {prefix} {i} " * 10}) + "\n"
                   for i in range(n))


def test_clean_says_which_inputs_could_not_be_read(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text(docs("a", 3) + "{broken\n")
    archive = gzip.compress(docs("b", 300).encode())
    (src / "b.jsonl.gz").write_bytes(archive[: len(archive) // 2])
    (src / "c.parquet").write_bytes(b"PAR1 not really")
    out = tmp_path / "out"
    assert main(["data", "clean", "--input", str(src), "--output", str(out), "--steps", "exact_dedup",
                 "--workers", "1"]) == 1
    captured = capsys.readouterr()
    assert "kept " in captured.out and "Traceback" not in captured.err
    err = captured.err.strip().splitlines()
    assert any(str(src / "b.jsonl.gz") in line and "cannot decompress" in line for line in err)
    assert any(str(src / "c.parquet") in line and "Parquet" in line for line in err)
    assert any(line.startswith("warning: 1 of ") and line.endswith(str(out / "rejects" / "read.jsonl"))
               for line in err)
    assert err[-1] == ("lmforge: error: 2 of 3 input files could not be read to the end (their readable records "
                       "were cleaned)")
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats["failed_inputs"]) == 2 and stats["records_rejected_at_read"] == 1
    assert "Input files not read to the end" in (out / "report.md").read_text()


def test_rejects_after_a_barrier_name_the_input_line(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(docs("a", 3))
    b.write_text(json.dumps({"id": "x", "text": "unique " * 10}) + "\n"
                 + json.dumps({"id": "copy", "text": "document a 1 " * 10}) + "\n")
    out = tmp_path / "out"
    assert main(["data", "clean", "--input", str(a), str(b), "--output", str(out), "--steps", "exact_dedup",
                 "--workers", "1"]) == 0
    rejects = [json.loads(line) for line in (out / "rejects" / "exact_dedup.jsonl").read_text().splitlines()]
    assert [(r["id"], r["source"]) for r in rejects] == [("copy", f"{b}:2")]
    kept = [json.loads(line) for f in sorted((out / "kept").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert all(set(r) == {"id", "text", "metadata"} for r in kept)  # the kept layout is unchanged


POOL = """
import time
from lmforge.data.executors import map_shards
map_shards(time.sleep, [120, 120], workers=2)
"""

# a worker of a platform without PR_SET_PDEATHSIG: the watchdog thread must end it
WATCHED = """
import os, sys, time
if os.fork() == 0:
    sys.platform = "elsewhere"
    from lmforge.data.executors import die_with_parent
    die_with_parent(os.getppid())
    time.sleep(120)
    os._exit(0)
time.sleep(120)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads process trees from /proc")
@pytest.mark.parametrize(("script", "n_workers"), [(POOL, 2), (WATCHED, 1)], ids=["pool", "watchdog"])
def test_workers_die_with_a_killed_parent(script, n_workers):
    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])})
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while len(workers) < n_workers and time.monotonic() < deadline:
            time.sleep(0.1)
            children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
            workers = [int(p) for p in children.read_text().split()] if children.exists() else []
        assert len(workers) == n_workers, "the workers did not start"
        time.sleep(0.5)  # let the workers run their initializer
        assert all(alive(pid) for pid in workers), "a worker ended before its parent was killed"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers), "workers outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running, not gone and not a zombie waiting for a reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
