"""Distributed checkpoints (torch.distributed.checkpoint): saved by 2 processes, resumed by 1 and by 2."""

import json
from pathlib import Path

import pytest

from lmforge.checkpoint.dcp import is_dcp_checkpoint
from lmforge.checkpoint.store import list_checkpoints
from lmforge.core.config import from_dict
from lmforge.train.pretrain import PretrainConfig, pretrain
from recipes import REL, STEPS, losses, parallel_recipe, recipe_file, torchrun
from recipes import rewind as rewind_copy

SAVED = 3  # parallel_recipe saves at steps 3 and 6


@pytest.fixture(scope="module")
def saved_at_two(tmp_path_factory, learnable_data):
    """A 2-process FSDP run of STEPS steps with a DCP checkpoint every SAVED steps (all kept)."""
    root = tmp_path_factory.mktemp("dcp")
    torchrun(recipe_file(root, learnable_data), 2, "--run_dir", str(root / "two"), "--parallel.data", "fsdp")
    return root


def rewind(root: Path, name: str) -> Path:
    """A copy of the 2-process run whose latest checkpoint is step SAVED (as if it had stopped there)."""
    return rewind_copy(root / "two", root / name, SAVED)


@pytest.mark.slow
def test_checkpoint_layout(saved_at_two):
    ckpts = list_checkpoints(saved_at_two / "two")
    assert [s for s, _ in ckpts] == [3, 6]
    for _, path in ckpts:
        assert is_dcp_checkpoint(path)
        assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["parallel"] == {"world_size": 2, "tensor": 1} and state["loader"]["cursor"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("data", ["fsdp", "ddp", "none"])
def test_resume_on_one_process(saved_at_two, learnable_data, data):
    """FSDP shards from 2 ranks load into 1 process: as FSDP, as DDP, or as a plain run without a process group
    (DCP reshards by parameter name)."""
    run = rewind(saved_at_two, f"one-{data}")
    cfg = from_dict(PretrainConfig, {**parallel_recipe(learnable_data), "run_dir": str(run), "resume": True,
                                     "parallel": {"data": data}})
    pretrain(cfg)
    reference = losses(saved_at_two / "two")
    resumed = losses(run)
    assert len(resumed) == STEPS
    assert resumed[SAVED:] == pytest.approx(reference[SAVED:], rel=REL)  # steps 4-6: weights, Adam state, data


@pytest.mark.slow
def test_resume_on_two_processes(saved_at_two):
    run = rewind(saved_at_two, "two-again")
    torchrun(saved_at_two / "recipe.json", 2, "--run_dir", str(run), "--parallel.data", "fsdp", "--resume", "true")
    assert losses(run)[SAVED:] == pytest.approx(losses(saved_at_two / "two")[SAVED:], rel=REL)

