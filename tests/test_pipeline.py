"""Pipeline parallelism on CPU (gloo): 2-stage GPipe / 1F1B runs repeat a 1-process run's losses, composed with
DDP, FSDP and TP on 4 processes, and checkpoints (DCP, the whole model's names) resume on another layout."""

import json

import pytest
import torch
import torch.distributed as dist

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.model import ModelConfig, Transformer, load_model
from lmforge.parallel import ParallelConfig
from lmforge.parallel.launch import init_process_group
from lmforge.parallel.pipeline import (
    PipelineRunner,
    StageModule,
    check_pipelinable,
    split_model,
    stage_layers,
    theoretical_bubble,
)
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import PretrainConfig, lm_loss, pretrain
from lmforge.train.trainer import check_pipeline_loop
from recipes import REL, STEPS, VOCAB, loop_config, losses, parallel_recipe, recipe_file, rewind, torchrun

ATOL_WEIGHTS = 1e-5
SAVED = 3  # parallel_recipe saves at steps 3 and 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory, learnable_data):
    """The 1-process run every layout is compared with, and the 2-stage 1F1B run (both save at steps 3 and 6)."""
    root = tmp_path_factory.mktemp("pp")
    pretrain(from_dict(PretrainConfig, {**parallel_recipe(learnable_data), "run_dir": str(root / "one")}))
    torchrun(recipe_file(root, learnable_data), 2, "--run_dir", str(root / "1f1b"), "--parallel.pipeline", "2",
             "--parallel.microbatches", "4")
    return root


def _same_run(root, name, reference="one"):
    one, other = losses(root / reference), losses(root / name)
    assert len(other) == STEPS
    assert other == pytest.approx(one, rel=REL)
    assert one[-1] < one[0] - 0.3  # it trained, so equal curves are not two flat lines


def _same_weights(a_dir, b_dir):
    a, b = load_model(a_dir).state_dict(), load_model(b_dir).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=ATOL_WEIGHTS, rtol=0)


def test_two_stage_1f1b_repeats_one_process(runs):
    """The quick one: 2 processes, 1F1B over 4 micro-batches: same losses, grad norms and final weights."""
    _same_run(runs, "1f1b")
    norms = [[r["grad_norm"] for r in read_metrics(runs / name / "metrics.jsonl") if "grad_norm" in r]
             for name in ("one", "1f1b")]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)  # clipping sees the global norm across stages
    _same_weights(runs / "one" / "model", runs / "1f1b" / "model")
    state = json.loads((runs / "1f1b" / "checkpoints" / "step_000006" / "trainer_state.json").read_text())
    assert state["format"] == "dcp" and state["parallel"] == {"world_size": 2, "tensor": 1, "pipeline": 2}


@pytest.mark.slow
def test_gpipe_repeats_one_process(runs):
    torchrun(runs / "recipe.json", 2, "--run_dir", str(runs / "gpipe"), "--parallel.pipeline", "2",
             "--parallel.pipeline_schedule", "gpipe")
    _same_run(runs, "gpipe")


@pytest.mark.slow
def test_interleaved_1f1b_repeats_one_process(runs, learnable_data):
    """Two stages per process (4 blocks: stages 0 and 2 on rank 0, 1 and 3 on rank 1)."""
    four = ["--model.n_layers", "4"]
    recipe = parallel_recipe(learnable_data)
    recipe["model"] = {**recipe["model"], "n_layers": 4}
    pretrain(from_dict(PretrainConfig, {**recipe, "run_dir": str(runs / "one-4")}))
    torchrun(runs / "recipe.json", 2, "--run_dir", str(runs / "interleaved"), "--parallel.pipeline", "2",
             "--parallel.pipeline_schedule", "interleaved-1f1b", *four)
    _same_run(runs, "interleaved", reference="one-4")
    _same_weights(runs / "one-4" / "model", runs / "interleaved" / "model")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--parallel.data", "ddp"], ["--parallel.data", "fsdp"],
                                   ["--parallel.tensor", "2"]], ids=["ppxddp", "ppxfsdp", "ppxtp"])
def test_four_processes_pipeline_composes(runs, extra):
    name = "pp" + "".join(extra).replace("--parallel.", "_")
    torchrun(runs / "recipe.json", 4, "--run_dir", str(runs / name), "--parallel.pipeline", "2", *extra)
    _same_run(runs, name)
    _same_weights(runs / "one" / "model", runs / name / "model")


@pytest.mark.slow
@pytest.mark.parametrize("data", ["none", "fsdp"])
def test_pipeline_checkpoint_resumes_in_one_process(runs, learnable_data, tmp_path, data):
    """The 2-stage run stopped at step 3 -> one process (plain, or FSDP's world of one) continues it with the
    uninterrupted run's losses: the DCP names are the whole model's."""
    run = rewind(runs / "1f1b", tmp_path / "resumed", SAVED)
    pretrain(from_dict(PretrainConfig, {**parallel_recipe(learnable_data), "run_dir": str(run), "resume": True,
                                        "parallel": {"data": data}}))
    assert losses(run) == pytest.approx(losses(runs / "one"), rel=REL)
    _same_weights(runs / "one" / "model", run / "model")


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_pipeline(runs, learnable_data, tmp_path):
    """And back: a 1-process DCP checkpoint (FSDP's world of one) stopped at step 3 -> 2 stages continue it."""
    fsdp = tmp_path / "fsdp-one"
    pretrain(from_dict(PretrainConfig, {**parallel_recipe(learnable_data), "run_dir": str(fsdp),
                                        "parallel": {"data": "fsdp"}}))
    run = rewind(fsdp, tmp_path / "resumed", SAVED)
    torchrun(runs / "recipe.json", 2, "--run_dir", str(run), "--parallel.pipeline", "2", "--resume", "true")
    assert losses(run) == pytest.approx(losses(runs / "one"), rel=REL)


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
    with pytest.raises(ConfigError, match="train.precision=fp16 with parallel.pipeline > 1"):
        check_pipeline_loop(loop_config(), "fp16", None)
    with pytest.raises(ConfigError, match="train.compile with parallel.pipeline > 1"):
        check_pipeline_loop(loop_config(compile=True), "fp32", None)
    with pytest.raises(ConfigError, match="evaluation with parallel.pipeline > 1"):
        check_pipeline_loop(loop_config(), "fp32", lambda model: {})
    check_pipeline_loop(loop_config(), "bf16", None)
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


class _Batches:
    def __init__(self, x):
        self.x, self.i = x, 0

    def next_batch(self):
        self.i += 1
        b = self.x[self.i - 1]
        return b[:, :-1], b[:, 1:]


def test_one_stage_schedule_accumulates_the_plain_gradient():
    """In-process world of one: the library's schedule over 4 micro-batches x 2 accumulation steps gives the plain
    mean-loss gradient (the shape-inference loss call and the library's own grad scaling stay out of it), and a
    batch the micro-batches do not divide is one line."""
    x = torch.randint(0, VOCAB, (2, 4, 13), generator=torch.Generator().manual_seed(0))
    ref = _model()
    ref_loss = sum(lm_loss(ref, (b[:, :-1], b[:, 1:]))[0] for b in x) / 2
    ref_loss.backward()
    model = _model()
    init_process_group("gloo", torch.device("cpu"))
    try:
        local, chunks = split_model(model, 1, [0])
        runner = PipelineRunner(ParallelConfig(pipeline=2), local, chunks, [0], 1, torch.device("cpu"),
                                dist.group.WORLD)
        loss, metrics, tokens = runner.forward_backward(lm_loss, _Batches(x), 2, "fp32", lambda b: b[0].numel())
        assert loss == pytest.approx(ref_loss.item(), rel=1e-6) and metrics == {} and tokens == 2 * 4 * 12
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        with pytest.raises(ConfigError, match="batch of 3 sequences must be divisible by parallel.microbatches=4"):
            runner.forward_backward(lm_loss, _Batches(x[:, :3]), 1, "fp32", lambda b: b[0].numel())
    finally:
        dist.destroy_process_group()
