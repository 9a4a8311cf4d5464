import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file
from tinymodels import debug_model

from lmforge.checkpoint.store import (
    LATEST_NAME,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from lmforge.core.config import from_dict
from lmforge.core.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer, load_model


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    return debug_model(50, seed, **overrides).train()


def trained(model: Transformer, steps: int = 2) -> torch.optim.AdamW:
    """An AdamW with real state (moments, step counts) after a few steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9), fused=True)
    for _ in range(steps):
        ids = torch.randint(0, 50, (2, 8))
        model(ids).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_round_trip_restores_model_optimizer_rng_and_state(tmp_path):
    model = tiny_model(0)
    opt = trained(model)
    path = save_checkpoint(tmp_path, 7, model, opt, {"loader": {"epoch": 1, "cursor": 3}}, keep=2)
    expected_draw = torch.rand(5)  # the RNG stream right after the save

    assert path.name == "step_000007"
    assert sorted(p.name for p in path.iterdir()) == ["checksums.json", "config.json", "model.safetensors",
                                                      "optimizer.safetensors", "trainer_state.json"]
    assert (tmp_path / "checkpoints" / LATEST_NAME).read_text().strip() == "step_000007"
    keys = set(load_file(str(path / "optimizer.safetensors")))
    assert "state.0.exp_avg" in keys and "state.0.exp_avg_sq" in keys
    assert not any(k.endswith(".step") for k in keys)  # scalars live in trainer_state.json
    meta = json.loads((path / "trainer_state.json").read_text())
    assert meta["optimizer"]["scalar_state"]["0"]["step"] == {"tensor": 2.0, "dtype": "float32"}
    assert meta["optimizer"]["param_groups"][0]["betas"] == [0.8, 0.9]

    other = tiny_model(1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=5.0, fused=True)
    state = load_checkpoint(tmp_path, other, other_opt)
    assert state["step"] == 7 and state["loader"] == {"epoch": 1, "cursor": 3}
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    saved, loaded = opt.state_dict(), other_opt.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    for idx, s in saved["state"].items():
        for k, v in s.items():
            got = loaded["state"][idx][k]
            assert torch.equal(got, v) and got.dtype == v.dtype, (idx, k)
    assert torch.equal(torch.rand(5), expected_draw)
    # both optimizers take the same next step
    for m, o in ((model, opt), (other, other_opt)):
        torch.manual_seed(3)
        m(torch.randint(0, 50, (2, 8))).float().logsumexp(-1).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_is_a_model_directory(tmp_path):
    model = tiny_model(0, tie_embeddings=True)
    path = save_checkpoint(tmp_path, 1, model, trained(model, 1), {}, keep=1)
    loaded = load_model(path)
    ids = torch.randint(0, 50, (1, 6))
    assert torch.equal(loaded(ids), model.eval()(ids))


def test_prune_keeps_newest_and_cleans_stale_temp_dirs(tmp_path):
    model = tiny_model()
    opt = trained(model, 1)
    stale = tmp_path / "checkpoints" / ".tmp-step_000009-abc"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a file")
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert latest_checkpoint(tmp_path).name == "step_000004"
    assert not stale.exists()
    for step in (5, 6, 7):
        save_checkpoint(tmp_path, step, model, opt, {}, keep=0)  # 0 keeps all
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4, 5, 6, 7]


def test_no_checkpoint_returns_none(tmp_path):
    model = tiny_model()
    assert load_checkpoint(tmp_path, model, None) is None


def test_mismatched_model_config_names_the_key(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path, 1, model, trained(model, 1), {}, keep=1)
    other = tiny_model(n_layers=3)
    with pytest.raises(LmforgeError) as err:
        load_checkpoint(tmp_path, other, torch.optim.AdamW(other.parameters()))
    msg = str(err.value)
    assert "model.n_layers=2" in msg and "model.n_layers=3" in msg and "\n" not in msg


def test_latest_naming_a_missing_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / LATEST_NAME).write_text("step_000005\n")
    with pytest.raises(LmforgeError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path, tiny_model(), None)


def test_optimizer_of_a_different_shape_is_an_error(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path, 1, model, trained(model, 1), {}, keep=1)
    other = tiny_model()
    groups = [{"params": [p for n, p in other.named_parameters() if "norm" in n]},
              {"params": [p for n, p in other.named_parameters() if "norm" not in n]}]
    with pytest.raises(LmforgeError, match="optimizer parameter groups"):
        load_checkpoint(tmp_path, other, torch.optim.AdamW(groups))


WRITER = textwrap.dedent("""
    import sys, torch
    from lmforge.core.config import from_dict
    from lmforge.model import ModelConfig, Transformer
    from lmforge.checkpoint.store import save_checkpoint

    torch.manual_seed(0)
    model = Transformer(from_dict(ModelConfig, dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4,
                                                     max_seq_len=64)))
    opt = torch.optim.AdamW(model.parameters())
    first = next(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    step = 0
    while True:
        step += 1
        with torch.no_grad():  # stamp the step into weights and optimizer state: a mix would show
            model.embed.weight[0, 0] = step
            opt.state[first]["exp_avg"].view(-1)[0] = step
        save_checkpoint(sys.argv[1], step, model, opt, {"marker": step}, keep=2)
        print(step, flush=True)
""")


def test_sigkill_while_saving_leaves_a_loadable_latest(tmp_path):
    """Kill -9 the writer at random moments during a save: `latest` must name a complete, consistent one."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(1234)
    for trial in range(3):
        run = tmp_path / f"run{trial}"
        proc = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "1"  # the first checkpoint is complete
            t0 = time.perf_counter()
            assert proc.stdout.readline().strip() == "2"
            save_time = time.perf_counter() - t0
            deadline = time.time() + 20
            root = run / "checkpoints"
            while not any(p.name.startswith(".tmp-") for p in root.iterdir()):  # a save is under way
                assert time.time() < deadline
                time.sleep(0.001)
            time.sleep(rng.uniform(0, save_time))
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL

        model = Transformer(from_dict(ModelConfig, dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4,
                                                        max_seq_len=64)))
        opt = torch.optim.AdamW(model.parameters())
        state = load_checkpoint(run, model, opt)
        step = state["step"]
        assert step >= 2 and state["marker"] == step
        assert model.embed.weight[0, 0].item() == step
        assert opt.state[next(model.parameters())]["exp_avg"].view(-1)[0].item() == step
        assert load_model(latest_checkpoint(run)).embed.weight[0, 0].item() == step
        save_checkpoint(run, step + 1, model, opt, {}, keep=2)  # the next save clears any half-written dir
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
