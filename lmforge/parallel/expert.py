"""Expert parallelism, applied from outside the model: each MoE layer's routed experts are sharded over an
expert-parallel (EP) process group, and tokens travel to the rank that holds their expert by all-to-all.

Layout: W processes form a 2-D mesh ("edp", "ep") of shape (W / EP, EP). EP rank r of a group holds experts
[r * E/EP, (r + 1) * E/EP) of every MoE layer; the W / EP groups are data-parallel replicas of each other
(every rank reads its own slice of the batch). The router, shared experts and all dense weights stay
replicated on every rank.

`MoE.dispatch` already sorts a rank's (token, expert) assignments by expert, so the rows bound for each EP peer
are contiguous. `ShardedExperts.forward` (which replaces `MoE.experts`) exchanges per-expert row counts
(all_to_all_single), sends the rows (all_to_all_single with those split sizes; its backward is the reverse
all-to-all), runs its local experts on what it received, and sends the outputs back the same way. The
expert weights are DTensors sharded on dim 0 over "ep" and replicated over "edp", so DCP checkpoints store them
under their unsharded names and shapes (an EP run's checkpoint loads on any other layout, and back).

Gradients: the backward all-to-all hands each shard the gradient of every EP peer's tokens; `sync_expert_grads`
then sums it over the shard's data-parallel replicas ("edp") and divides by W, the same scale DDP gives the
replicated parameters (which it averages over the whole world).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.model.moe import MoE, expert_ffn


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits whose backward sends the gradients back the reverse way."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
                ) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """Rows x[sum(in_splits[:j]) : ...] go to rank j; returns the rows received, grouped by source rank."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ShardedExperts(nn.Module):
    """This rank's E / EP experts of one MoE layer, called like `lmforge.model.moe.Experts` with ALL of the
    rank's routed rows (sorted by global expert id). `received` counts the rows each local expert got since
    `take_received` last read it (the per-rank load the metrics log shows)."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, mesh: Any) -> None:
        super().__init__()
        from torch.distributed.tensor import DTensor, Replicate, Shard

        self.n_experts = up.shape[0]
        self.ep_mesh = mesh["ep"]
        self.ep = self.ep_mesh.size()
        self.local = self.n_experts // self.ep
        r = self.ep_mesh.get_local_rank()
        rows = slice(r * self.local, (r + 1) * self.local)
        placements = [Replicate(), Shard(0)]

        def shard(w: torch.Tensor) -> nn.Parameter:
            local = w.detach()[rows].clone()
            return nn.Parameter(DTensor.from_local(local, mesh, placements, run_check=False, shape=w.shape,
                                                   stride=w.stride()))

        self.up, self.down = shard(up), shard(down)
        self.register_buffer("received", torch.zeros(self.local, dtype=torch.long), persistent=False)

    def forward(self, xs: torch.Tensor, counts: torch.Tensor, slot: torch.Tensor, expert: torch.Tensor
                ) -> torch.Tensor:
        group = self.ep_mesh.get_group()
        # counts[j * local + i]: my rows for expert i of EP rank j -> recv[s, i]: rank s's rows for my expert i
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts.contiguous(), group=group)
        recv = recv.view(self.ep, self.local)
        send_splits = counts.view(self.ep, self.local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        got = all_to_all(xs, recv_splits, send_splits, group)  # grouped by source, then by expert
        local_ids = torch.arange(self.local, device=xs.device).repeat(self.ep).repeat_interleave(recv.flatten())
        order = torch.argsort(local_ids, stable=True)  # by local expert, then by source rank
        sorted_ids = local_ids[order]
        local_counts = recv.sum(0)
        starts = torch.cumsum(local_counts, 0) - local_counts
        local_slot = torch.arange(order.numel(), device=xs.device) - starts[sorted_ids]
        if self.training:
            with torch.no_grad():
                self.received += local_counts
        ys = expert_ffn(got[order], local_counts, local_slot, sorted_ids, self.up.to_local(),
                        self.down.to_local())
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return all_to_all(ys.index_select(0, inverse), send_splits, recv_splits, group)

    def take_received(self) -> torch.Tensor:
        out = self.received.clone()
        self.received.zero_()
        return out


def expert_mesh(world: int, ep: int, device_type: str) -> Any:
    """The ("edp", "ep") mesh of W / EP data-parallel replicas of EP-rank expert groups."""
    from torch.distributed.device_mesh import init_device_mesh

    if world % ep:
        raise ConfigError(f"parallel.expert={ep} must divide the number of processes ({world})")
    return init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("edp", "ep"))


def apply_expert_parallel(model: nn.Module, mesh: Any) -> list[str]:
    """Replace every MoE layer's experts by this rank's shard (`ShardedExperts`); returns the names of the
    shards' parameters (the plain model's names) and buffers, for DDP to ignore. The model must hold identical
    full weights on every rank (same seed or checkpoint) when this runs."""
    ep = mesh["ep"].size()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        E = module.cfg.moe_experts
        if E % ep:
            raise ConfigError(f"parallel.expert={ep} must divide model.moe_experts ({E}): each expert-parallel "
                              "rank holds the same number of experts")
        module.experts = ShardedExperts(module.experts.up, module.experts.down, mesh)
        names += [f"{name}.experts.{n}" for n in ("up", "down", "received")]
    if not names:
        raise ConfigError(f"parallel.expert={ep} needs a model with MoE layers (model.moe_experts > 0)")
    return names


def sharded_experts(model: nn.Module) -> list[ShardedExperts]:
    return [m for m in model.modules() if isinstance(m, ShardedExperts)]


@torch.no_grad()
def sync_expert_grads(model: nn.Module, mesh: Any, world: int) -> None:
    """Sum each expert shard's gradient over its data-parallel replicas and divide by the world size: the
    mean-over-ranks gradient DDP gives replicated parameters."""
    group = mesh.get_group("edp")
    for experts in sharded_experts(model):
        for p in (experts.up, experts.down):
            if p.grad is None:
                continue
            g = p.grad.to_local()
            if mesh["edp"].size() > 1:
                dist.all_reduce(g, group=group)
            g.div_(world)


def expert_load_metrics(model: nn.Module, mesh: Any) -> dict[str, float]:
    """Collective over the whole world: for each rank r, tokens its local experts received per MoE layer and
    forward (`ep_tokens_r<r>`) and the busiest local expert's share relative to the mean
    (`ep_expert_max_mean_r<r>`, 1.0 when balanced), since the last call."""
    layers = sharded_experts(model)
    mine = torch.stack([m.take_received() for m in layers]).to(torch.float64)  # [layers, local]
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    out: dict[str, float] = {}
    for r, load in enumerate(gathered):
        out[f"ep_tokens_r{r}"] = float(load.sum(1).mean())
        mean = load.mean(1).clamp(min=1.0)
        out[f"ep_expert_max_mean_r{r}"] = float((load.max(1).values / mean).mean())
    return out
