"""Distributed training on CPU (gloo): 2-process DDP/FSDP2 runs repeat a 1-process run with the same global
batch; TP=2 repeats TP=1; plans applied from outside the model (lmforge.parallel)."""

import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.model import ModelConfig, Transformer, load_model
from lmforge.parallel import ParallelConfig
from lmforge.parallel.checkpointing import apply_activation_checkpointing
from lmforge.parallel.grad import clip_grad_norm
from lmforge.parallel.launch import describe_failure, free_port
from lmforge.parallel.run import data_slice
from lmforge.parallel.tp import TensorParallelLayout, interleave_rows
from lmforge.train.pretrain import PretrainConfig, pretrain
from recipes import REL, STEPS, VOCAB, losses, parallel_recipe, torchrun

ATOL_WEIGHTS = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, learnable_data):
    """One 1-process reference run, plus 2-process DDP, FSDP and tensor-parallel runs of the same recipe."""
    root = tmp_path_factory.mktemp("parallel")
    config = root / "recipe.json"
    config.write_text(json.dumps(parallel_recipe(learnable_data)))
    ref = from_dict(PretrainConfig, {**parallel_recipe(learnable_data), "run_dir": str(root / "one")})
    pretrain(ref)
    torchrun(config, 2, "--run_dir", str(root / "ddp"), "--parallel.data", "ddp")
    torchrun(config, 2, "--run_dir", str(root / "fsdp"), "--parallel.data", "fsdp")
    torchrun(config, 2, "--run_dir", str(root / "tp"), "--parallel.tensor", "2")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp", "tp"])
def test_two_processes_repeat_one_process(runs, kind):
    one, two = losses(runs / "one"), losses(runs / kind)
    assert len(two) == STEPS
    assert two == pytest.approx(one, rel=REL)
    assert one[-1] < one[0] - 0.3  # it trained, so equal curves are not two flat lines
    a = load_model(runs / "one" / "model").state_dict()
    b = load_model(runs / kind / "model").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=ATOL_WEIGHTS, rtol=0)
    # rank 0 alone wrote the run's files; rank 1's output went to its log
    assert (runs / kind / "loss.png").is_file() and (runs / kind / "logs" / "rank_1.log").is_file()
    assert not list((runs / kind).glob("logs/rank_0*"))


@pytest.mark.slow
@pytest.mark.parametrize("data", ["fsdp", "none"])
def test_tensor_parallel_checkpoint_refuses_another_degree(runs, learnable_data, tmp_path, data):
    """TP checkpoints hold the permuted fused rows: resuming at tensor=1 must stop with one line, not train on."""
    run = tmp_path / "tp"
    shutil.copytree(runs / "tp", run)
    cfg = from_dict(PretrainConfig, {**parallel_recipe(learnable_data), "run_dir": str(run), "resume": True,
                                     "parallel": {"data": data}})
    with pytest.raises(ConfigError, match="saved with parallel.tensor=2, this run has parallel.tensor=1"):
        pretrain(cfg)


# ----------------------------------------------------------------------------------------------
# tensor parallel: TP=2 forward/backward repeat TP=1


def _tp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.parallel.tp import apply_tensor_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        cfg = from_dict(ModelConfig, {"preset": "debug", "vocab_size": VOCAB, "max_seq_len": 32})
        ref = Transformer(cfg)
        tp = Transformer(cfg)
        tp.load_state_dict(ref.state_dict())
        layout = apply_tensor_parallel(tp, init_device_mesh("cpu", (world,)))
        x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
        y_ref, y_tp = ref(x), tp(x)
        y_ref.square().mean().backward()
        y_tp.square().mean().backward()
        norm_ref = clip_grad_norm(ref.parameters(), 1e9)
        norm_tp = clip_grad_norm(tp.parameters(), 1e9)
        full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in tp.state_dict().items()}
        restored = layout.unpermute(full)
        same_weights = all(torch.equal(restored[n], v) for n, v in ref.state_dict().items())
        if rank == 0:
            queue.put(((y_tp - y_ref).abs().max().item(), y_ref.abs().max().item(), norm_ref, norm_tp,
                       same_weights, sorted(layout.permuted)[:2]))
        dist.barrier()  # no rank tears gloo down while its peer still has traffic in flight (SIGABRT otherwise)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_two_matches_one():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_tp_worker, args=(2, free_port(), queue), nprocs=2, start_method="spawn")
    diff, scale, norm_ref, norm_tp, same_weights, permuted = queue.get(timeout=5)
    assert scale > 0.1 and diff < 1e-5  # fp32: summation order only
    assert norm_tp == pytest.approx(norm_ref, rel=1e-5)
    assert same_weights  # the permuted fused rows come back exactly for export
    assert permuted == ["blocks.0.attn.qkv.weight", "blocks.0.mlp.up.weight"]


# ----------------------------------------------------------------------------------------------
# fast unit checks


def test_interleave_rows_gives_each_shard_its_part_of_every_block():
    perm = interleave_rows([4, 2, 2], 2)  # q rows 0-3, k rows 4-5, v rows 6-7
    assert perm.tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    w = torch.arange(8.0)[:, None]
    layout = TensorParallelLayout(2, {"w": perm})
    assert torch.equal(layout.unpermute({"w": w[perm]})["w"], w)


def test_activation_checkpointing_same_gradients_less_saved_memory():
    def saved_bytes_and_grads(mode: str):
        torch.manual_seed(0)
        model = Transformer(from_dict(ModelConfig, {"preset": "debug", "vocab_size": VOCAB, "max_seq_len": 32}))
        assert apply_activation_checkpointing(model, mode) == (0 if mode == "none" else 2)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).logsumexp(-1).mean()
        loss.backward()
        return total, {n: p.grad for n, p in model.named_parameters()}, list(model.state_dict())

    plain, g0, names0 = saved_bytes_and_grads("none")
    ckpt, g1, names1 = saved_bytes_and_grads("full")
    assert names0 == names1  # parameter names (checkpoints) unchanged
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n])
    assert ckpt < 0.6 * plain


def test_config_and_slicing_errors():
    with pytest.raises(ConfigError, match="parallel.tensor"):
        ParallelConfig(tensor=0)
    with pytest.raises(ConfigError, match="ddp cannot be combined"):
        ParallelConfig(data="ddp", tensor=2)
    assert data_slice(8, None) == {"batch_size": 8}

    class Run:
        dp_size, dp_rank = 3, 1

    with pytest.raises(ConfigError, match="divisible by the 3 data-parallel ranks"):
        data_slice(8, Run())
    with pytest.raises(ConfigError, match="nproc=2 needs parallel.data=ddp or fsdp"):
        pretrain(from_dict(PretrainConfig, {"nproc": 2}))
    assert describe_failure(1, -9) == "worker rank 1 was killed by SIGKILL"
    assert describe_failure(0, 3) == "worker rank 0 exited with code 3"


def test_clip_grad_norm_plain_matches_torch():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m(torch.ones(2, 4)).sum().mul(10).backward()
    expected = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5).item()
    assert clip_grad_norm(b.parameters(), 0.5) == pytest.approx(expected)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad)


def test_fsdp_world_of_one_repeats_plain_run_and_applies_bf16_policy(learnable_data, tmp_path):
    """No launcher: a lone process with parallel.data=fsdp forms a world of one (fast CI check of the FSDP path,
    DCP checkpoints included); the bf16 MixedPrecisionPolicy visibly changes the numbers, but only slightly."""
    base = parallel_recipe(learnable_data)
    base["train"] = {**base["train"], "steps": 3, "save_every": 0}
    curves = {}
    for name, parallel in [("plain", {}), ("fsdp", {"data": "fsdp"}),
                           ("bf16", {"data": "fsdp", "param_dtype": "bf16", "reduce_dtype": "bf16"})]:
        pretrain(from_dict(PretrainConfig, {**base, "run_dir": str(tmp_path / name), "parallel": parallel}))
        curves[name] = losses(tmp_path / name)
    assert curves["fsdp"] == pytest.approx(curves["plain"], rel=REL)
    assert (tmp_path / "fsdp" / "checkpoints" / "step_000003" / ".metadata").is_file()
    diff = max(abs(a - b) for a, b in zip(curves["bf16"], curves["plain"]))
    assert 0 < diff < 0.05
