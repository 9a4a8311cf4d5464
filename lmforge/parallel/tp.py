"""Tensor-parallel plan for the Transformer (Megatron-LM, Shoeybi et al. 2019), applied from outside the model.

Attention: `qkv` is split column-wise (each rank computes its own heads) and `out` row-wise (partial sums,
all-reduced), so one all-reduce per sublayer in forward and one in backward; the MLP does the same with
`up` (column) and `down` (row). The model fuses rows: `qkv` holds [q; k; v] and a gated `up` holds
[gate; up]. A contiguous column shard would hand rank 0 only q rows, so before sharding the rows are
permuted to [q_0; k_0; v_0; q_1; k_1; v_1; ...]; each rank's slice then splits exactly like the unsharded
layer, with n_heads/K and n_kv_heads/K heads. `TensorParallelLayout.unpermute` undoes this for export.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.model.attention import Attention
from lmforge.model.layers import MLP


def interleave_rows(sizes: list[int], k: int) -> torch.Tensor:
    """Row order that makes shard r of K hold the r-th 1/K of every block in `sizes` (the fused layout)."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    order = [torch.arange(s + r * (n // k), s + (r + 1) * (n // k)) for r in range(k)
             for s, n in zip(starts, sizes)]
    return torch.cat(order)


@dataclass
class TensorParallelLayout:
    """Which parameters had their rows permuted (name -> permutation), so full tensors can be restored."""

    degree: int
    permuted: dict[str, torch.Tensor] = field(default_factory=dict)

    def unpermute(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(state)
        for name, perm in self.permuted.items():
            if name in out:
                restored = torch.empty_like(out[name])
                restored[perm] = out[name]
                out[name] = restored
        return out


def _permute_rows(module: nn.Linear, prefix: str, sizes: list[int], k: int, layout: TensorParallelLayout) -> None:
    perm = interleave_rows(sizes, k)
    with torch.no_grad():
        for pname in ("weight", "bias"):
            p = getattr(module, pname, None)
            if p is not None:
                p.copy_(p[perm])
                layout.permuted[f"{prefix}.{pname}"] = perm


def tp_plan(model: nn.Module, k: int) -> tuple[dict[str, object], TensorParallelLayout]:
    """The parallelize_module plan for every block whose attention/MLP is the dense kind, plus the layout.

    Mutates the blocks' fused rows and head counts for degree `k` (call `apply_tensor_parallel` instead).
    Blocks of other kinds (MoE, MLA) stay replicated.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, object] = {}
    layout = TensorParallelLayout(k)
    cfg = model.cfg
    blocks = model.blocks  # a ModuleDict keyed by layer index in a pipeline stage (lmforge.parallel.pipeline)
    for i, block in (blocks.items() if isinstance(blocks, nn.ModuleDict) else enumerate(blocks)):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if type(attn) is Attention:
            H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
            if H % k or KV % k:
                raise ConfigError(f"parallel.tensor={k} must divide model.n_heads={H} and n_kv_heads={KV}")
            _permute_rows(attn.qkv, f"blocks.{i}.attn.qkv", [H * D, KV * D, KV * D], k, layout)
            attn.n_heads, attn.n_kv_heads = H // k, KV // k
            plan[f"blocks.{i}.attn.qkv"] = ColwiseParallel()
            plan[f"blocks.{i}.attn.out"] = RowwiseParallel()
        if type(mlp) is MLP:
            if cfg.d_ff % k:
                raise ConfigError(f"parallel.tensor={k} must divide model.d_ff={cfg.d_ff}")
            if mlp.gated:
                _permute_rows(mlp.up, f"blocks.{i}.mlp.up", [cfg.d_ff, cfg.d_ff], k, layout)
            plan[f"blocks.{i}.mlp.up"] = ColwiseParallel()
            plan[f"blocks.{i}.mlp.down"] = RowwiseParallel()
    if not plan:
        raise ConfigError(f"parallel.tensor={k}: no dense attention or MLP layer to shard in this model")
    return plan, layout


def apply_tensor_parallel(model: nn.Module, mesh) -> TensorParallelLayout:
    """Shard `model` in place over the 1-D device mesh `mesh` (its size is the TP degree K)."""
    from torch.distributed.tensor.parallel import parallelize_module

    plan, layout = tp_plan(model, mesh.size())
    parallelize_module(model, mesh, plan)
    return layout
