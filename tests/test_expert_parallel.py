"""Expert parallelism on CPU (gloo): MoE experts sharded over processes with all-to-all dispatch give the
replicated layer's outputs and gradients; EP x DP training repeats the one-process losses; checkpoints move
between layouts (lmforge.parallel.expert)."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.model import ModelConfig, load_model
from lmforge.model.moe import MoE
from lmforge.parallel import ParallelConfig
from lmforge.parallel.expert import expert_mesh
from lmforge.parallel.launch import free_port
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import PretrainConfig, pretrain
from recipes import REL, STEPS, losses, parallel_recipe, rewind, torchrun

MOE = {"moe_experts": 4, "moe_top_k": 2, "moe_d_ff": 32, "moe_shared_experts": 1}


def _layer(seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_heads=4, n_layers=2, **MOE)
    return MoE(cfg)


def _layer_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    from lmforge.parallel.expert import apply_expert_parallel, expert_load_metrics, sync_expert_grads

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        ref, ep = _layer(), _layer()
        mesh = expert_mesh(world, world, "cpu")
        names = apply_expert_parallel(torch.nn.ModuleDict({"moe": ep}), mesh)
        # every rank its own tokens (uneven routing: rank 1 gets more rows)
        x = torch.randn(2, 5 + 3 * rank, 32, generator=torch.Generator().manual_seed(10 + rank))
        x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y_ep = ref(x_ref), ep(x_ep)
        w = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(20 + rank))
        (y_ref * w).sum().backward()
        (y_ep * w).sum().backward()
        sync_expert_grads(ep, mesh, 1)  # a world of EP peers only: no replicas, no scaling (world=1)
        # the replicated reference: expert grads summed over every rank's tokens, this rank's shard of them
        local = slice(rank * 2, rank * 2 + 2)
        errs = {"out": (y_ep - y_ref).abs().max().item(), "x": (x_ep.grad - x_ref.grad).abs().max().item(),
                "router": (ep.router.gate.weight.grad - ref.router.gate.weight.grad).abs().max().item()}
        for name in ("up", "down"):
            g = getattr(ref.experts, name).grad.clone()
            dist.all_reduce(g)
            errs[name] = (getattr(ep.experts, name).grad.to_local() - g[local]).abs().max().item()
        full = ep.experts.up.full_tensor()
        metrics = expert_load_metrics(ep, mesh)
        odd = MoE(ModelConfig(d_model=32, n_heads=4, n_layers=2, **{**MOE, "moe_experts": 3}))
        try:
            apply_expert_parallel(odd, mesh)
            odd_error = ""
        except ConfigError as e:
            odd_error = str(e)
        if rank == 0:
            queue.put((errs, y_ref.abs().max().item(), names, torch.equal(full, ref.experts.up.detach()), metrics,
                       odd_error))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~15 s of imports on a shared CPU
def test_expert_parallel_layer_matches_replicated_layer():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_layer_worker, args=(2, free_port(), queue), nprocs=2, start_method="spawn")
    errs, scale, names, same_full, metrics, odd_error = queue.get(timeout=5)
    assert scale > 0.01
    for key, err in errs.items():
        assert err < 1e-5, (key, err)
    assert names == ["moe.experts.up", "moe.experts.down", "moe.experts.received"]
    assert same_full  # the DTensor shards put back together are the replicated weights
    # 10 + 16 tokens x top-2 all landed on some rank's experts
    assert metrics["ep_tokens_r0"] + metrics["ep_tokens_r1"] == 2 * (10 + 16)
    assert metrics["ep_expert_max_mean_r0"] >= 1.0
    assert odd_error == "parallel.expert=2 must divide model.moe_experts (3): each expert-parallel rank holds " \
                        "the same number of experts"


def test_expert_parallel_config_errors():
    with pytest.raises(ConfigError, match="parallel.expert must be >= 1"):
        ParallelConfig(expert=0)
    with pytest.raises(ConfigError, match="parallel.expert must be 1 unless parallel.data=ddp"):
        ParallelConfig(expert=2)
    with pytest.raises(ConfigError, match="parallel.expert must be 1 unless"):
        ParallelConfig(expert=2, data="fsdp")
    with pytest.raises(ConfigError, match=r"parallel.expert=2 must divide the number of processes \(3\)"):
        expert_mesh(3, 2, "cpu")


# ----------------------------------------------------------------------------------------------
# EP x DP training: 4 processes repeat 1; checkpoints resume on other layouts

SAVED = 3  # parallel_recipe saves at steps 3 and 6


def moe_recipe(data) -> dict:
    """parallel_recipe with MoE blocks; no balance losses (they are per-rank nonlinear, as under plain DDP)."""
    base = parallel_recipe(data)
    return {**base, "model": {**base["model"], **MOE}}


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory, learnable_data):
    root = tmp_path_factory.mktemp("expert")
    config = root / "recipe.json"
    config.write_text(json.dumps(moe_recipe(learnable_data)))
    pretrain(from_dict(PretrainConfig, {**moe_recipe(learnable_data), "run_dir": str(root / "one")}))
    torchrun(config, 4, "--run_dir", str(root / "ep2dp2"), "--parallel.data", "ddp", "--parallel.expert", "2")
    return root


def rewound(root, name: str):
    """A copy of the EP x DP run whose latest checkpoint is step SAVED."""
    return rewind(root / "ep2dp2", root / name, SAVED)


@pytest.mark.slow
def test_expert_by_data_parallel_repeats_one_process(ep_runs):
    one, four = losses(ep_runs / "one"), losses(ep_runs / "ep2dp2")
    assert len(four) == STEPS
    assert four == pytest.approx(one, rel=REL)
    assert one[-1] < one[0] - 0.3
    a = load_model(ep_runs / "one" / "model").state_dict()
    b = load_model(ep_runs / "ep2dp2" / "model").state_dict()  # rank 0 gathered the expert shards
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0)
    rows = [r for r in read_metrics(ep_runs / "ep2dp2" / "metrics.jsonl") if "loss" in r]
    loads = [rows[-1][f"ep_tokens_r{r}"] for r in range(4)]
    # per MoE layer and step: every rank routes its 2 x 16 tokens to top-2 experts somewhere
    assert sum(loads) == pytest.approx(8 * 16 * 2)
    assert all(rows[-1][f"ep_expert_max_mean_r{r}"] >= 1 for r in range(4))
    state = json.loads((ep_runs / "ep2dp2" / "checkpoints" / "step_000006" / "trainer_state.json").read_text())
    assert state["parallel"] == {"world_size": 4, "tensor": 1, "expert": 2}


@pytest.mark.slow
def test_expert_checkpoint_resumes_on_one_process(ep_runs, learnable_data):
    """Expert shards saved under their unsharded names load into a plain single-process model."""
    run = rewound(ep_runs, "one-resumed")
    pretrain(from_dict(PretrainConfig, {**moe_recipe(learnable_data), "run_dir": str(run), "resume": True}))
    assert losses(run)[SAVED:] == pytest.approx(losses(ep_runs / "one")[SAVED:], rel=REL)


@pytest.mark.slow
def test_expert_checkpoint_resumes_at_another_expert_layout(ep_runs):
    """EP=2 x DP=2 -> EP=2 alone on 2 processes (each expert shard now has one replica, batch split in 2)."""
    run = rewound(ep_runs, "ep2-resumed")
    torchrun(ep_runs / "recipe.json", 2, "--run_dir", str(run), "--parallel.data", "ddp", "--parallel.expert",
             "2", "--resume", "true")
    assert losses(run)[SAVED:] == pytest.approx(losses(ep_runs / "one")[SAVED:], rel=REL)
