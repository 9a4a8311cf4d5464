"""Pipeline parallelism on CPU (gloo): 2-stage GPipe / 1F1B runs repeat a 1-process run's losses, composed with
DDP, FSDP and TP on 4 processes, and checkpoints (DCP, the whole model's names) resume on another layout."""

import json

import pytest
import torch

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.model import ModelConfig, Transformer, load_model
from lmforge.parallel import ParallelConfig
from lmforge.parallel.pipeline import StageModule, check_pipelinable, split_model, stage_layers, theoretical_bubble
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import PretrainConfig, pretrain
from recipes import REL, STEPS, VOCAB, losses, parallel_recipe, torchrun

ATOL_WEIGHTS = 1e-5


def _recipe(data, root, **train):
    recipe = parallel_recipe(data)
    recipe["train"] = {**recipe["train"], **train}
    path = root / "recipe.json"
    path.write_text(json.dumps(recipe))
    return recipe, path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, learnable_data):
    """The 1-process run every layout is compared with (checkpoints at steps 3 and 6)."""
    root = tmp_path_factory.mktemp("pp")
    recipe, path = _recipe(learnable_data, root)
    pretrain(from_dict(PretrainConfig, {**recipe, "run_dir": str(root / "one")}))
    return root, path


def _same_run(root, name, steps=STEPS):
    one, other = losses(root / "one"), losses(root / name)
    assert len(other) == steps
    assert other == pytest.approx(one[:steps], rel=REL)
    assert one[-1] < one[0] - 0.3  # it trained, so equal curves are not two flat lines


def _same_weights(a_dir, b_dir):
    a, b = load_model(a_dir).state_dict(), load_model(b_dir).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=ATOL_WEIGHTS, rtol=0)


def test_two_stage_1f1b_repeats_one_process(reference):
    """The quick one: 2 processes, 1F1B over 4 micro-batches, same losses, grad norms and final weights."""
    root, recipe = reference
    torchrun(recipe, 2, "--run_dir", str(root / "1f1b"), "--parallel.pipeline", "2",
             "--parallel.microbatches", "4")
    _same_run(root, "1f1b")
    norms = [[r["grad_norm"] for r in read_metrics(root / name / "metrics.jsonl") if "grad_norm" in r]
             for name in ("one", "1f1b")]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)  # clipping sees the global norm across stages
    _same_weights(root / "one" / "model", root / "1f1b" / "model")
    state = json.loads((root / "1f1b" / "checkpoints" / "step_000006" / "trainer_state.json").read_text())
    assert state["format"] == "dcp" and state["parallel"]["pipeline"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "interleaved-1f1b"])
def test_other_schedules_repeat_one_process(reference, schedule):
    root, recipe = reference
    torchrun(recipe, 2, "--run_dir", str(root / schedule), "--parallel.pipeline", "2",
             "--parallel.pipeline_schedule", schedule)
    _same_run(root, schedule)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--parallel.data", "ddp"], ["--parallel.data", "fsdp"],
                                   ["--parallel.tensor", "2"]], ids=["ppxddp", "ppxfsdp", "ppxtp"])
def test_four_processes_pipeline_composes(reference, extra):
    root, recipe = reference
    name = "pp" + "".join(extra).replace("--parallel.", "_")
    torchrun(recipe, 4, "--run_dir", str(root / name), "--parallel.pipeline", "2", *extra)
    _same_run(root, name)
    _same_weights(root / "one" / "model", root / name / "model")


@pytest.mark.slow
def test_pipeline_checkpoint_resumes_in_one_process(reference, learnable_data, tmp_path):
    """PP=2 checkpoint at step 3 -> a plain 1-process resume continues with the uninterrupted run's losses."""
    root, recipe = reference
    run = tmp_path / "pp"
    torchrun(recipe, 2, "--run_dir", str(run), "--parallel.pipeline", "2", "--train.steps", "3")
    cfg = from_dict(PretrainConfig, {**parallel_recipe(learnable_data), "run_dir": str(run), "resume": True})
    pretrain(cfg)
    assert losses(run) == pytest.approx(losses(root / "one"), rel=REL)
    _same_weights(root / "one" / "model", run / "model")


# ----------------------------------------------------------------------------------------------
# fast unit checks


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(from_dict(ModelConfig, {"preset": "debug", "vocab_size": VOCAB, "max_seq_len": 32, **kw}))


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_stages_chained_equal_the_whole_model(position):
    model = _model(n_layers=4, position=position)
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    local, chunks = split_model(model, 4, [0, 1, 2, 3])
    h = x
    for chunk in chunks:
        h = chunk(h)
    torch.testing.assert_close(h, model(x, return_hidden=True), rtol=0, atol=0)
    # names are the whole model's, so checkpoints move between layouts
    assert set(local.state_dict()) == set(model.state_dict())
    assert list(chunks[2].state_dict()) == [n for n in model.state_dict() if n.startswith("blocks.2.")]


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="parallel.pipeline must be >= 1"):
        ParallelConfig(pipeline=0)
    with pytest.raises(ConfigError, match="parallel.microbatches must be 0 unless parallel.pipeline > 1"):
        ParallelConfig(microbatches=4)
    with pytest.raises(ConfigError, match=">= parallel.pipeline=4 with the 1f1b schedule"):
        ParallelConfig(pipeline=4, microbatches=2)
    with pytest.raises(ConfigError, match="a multiple of parallel.pipeline=2 with interleaved-1f1b"):
        ParallelConfig(pipeline=2, microbatches=3, pipeline_schedule="interleaved-1f1b")
    assert ParallelConfig(pipeline=2, microbatches=3, pipeline_schedule="gpipe").n_microbatches == 3
    assert ParallelConfig(pipeline=3).n_microbatches == 6 and ParallelConfig(pipeline=3).enabled
    with pytest.raises(ConfigError, match="model.n_layers must be divisible by the 3 pipeline stages"):
        check_pipelinable(_model(n_layers=4), 3)
    with pytest.raises(ConfigError, match="model.tie_embeddings: parallel.pipeline > 1 does not support"):
        check_pipelinable(_model(tie_embeddings=True), 2)
    assert list(stage_layers(8, 4, 3)) == [6, 7]
    assert theoretical_bubble(4, 8) == pytest.approx(3 / 11)
    assert isinstance(split_model(_model(), 2, [1])[0], StageModule)


def test_too_few_processes_is_one_line(learnable_data, tmp_path):
    recipe = parallel_recipe(learnable_data)
    cfg = from_dict(PretrainConfig, {**recipe, "run_dir": str(tmp_path / "run"),
                                     "parallel": {"pipeline": 2, "microbatches": 3, "pipeline_schedule": "gpipe"}})
    with pytest.raises(ConfigError, match="parallel.pipeline=2 x parallel.tensor=1 must divide the number of "
                                          r"processes \(1\)"):
        pretrain(cfg)
