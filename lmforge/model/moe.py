"""Mixture-of-Experts FFN: Switch/GLaM softmax top-k routing and DeepSeekMoE (shared + fine-grained routed
experts, sigmoid affinity, group-limited routing, aux-loss-free bias), with the balance losses as pure functions.

Dispatch sorts the (token, expert) assignments by expert once and runs all experts as one grouped GEMM per
projection (`F.grouped_mm`; no Python loop over tokens or experts). Where grouped_mm cannot run it uses one
batched matmul over a padded [experts, capacity, d] buffer, or, when loads are so skewed that padding would
more than double the work, a loop over experts on contiguous slices of the sorted tokens.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers import MLP

# ----------------------------------------------------------------------------------------------
# losses (pure functions)


def load_balance_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """sum_i f_i * P_i with f_i = E / (K * T) * #{tokens routed to i}, P_i = mean_t p_i,t.

    Switch Transformer eq. 4 (K = 1; the alpha * E factor is folded into f_i) and DeepSeek-V3's
    sequence-wise balance loss, eq. 17-20, when `probs` ([..., T, E], normalized affinities) and
    `experts` ([..., T, K]) carry a leading sequence dimension: it is computed per sequence, then averaged.
    """
    T, K = experts.shape[-2], experts.shape[-1]
    counts = F.one_hot(experts, n_experts).sum(dim=(-3, -2)).to(probs.dtype)  # [..., E]
    f = counts * n_experts / (K * T)
    return (f * probs.mean(dim=-2)).sum(-1).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE eq. 5: mean over tokens of logsumexp(router logits)^2; keeps logits small for bf16 stability."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


# ----------------------------------------------------------------------------------------------
# routing


class Router(nn.Module):
    """Top-k gate. `bias` ([E], persistent) is DeepSeek-V3's aux-loss-free balancing term: added to the
    affinities only to choose experts, never to weight them; `lmforge.train.moe_balance` updates it.
    `load` counts routed tokens per expert (training forwards only) since the balancer last read it."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.sigmoid = cfg.moe_router == "sigmoid"
        self.norm_top_k, self.scale = cfg.moe_norm_top_k, cfg.moe_routed_scale
        self.groups, self.top_groups = cfg.moe_groups, cfg.moe_top_groups
        self.gate = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)  # logits in fp32 (HF does the same)
        self.register_buffer("bias", torch.zeros(cfg.moe_experts))
        self.register_buffer("load", torch.zeros(cfg.moe_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (gate weights [N, K] fp32, expert ids [N, K], logits [N, E] fp32, affinities [N, E])."""
        logits = F.linear(x.float(), self.gate.weight.float())
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)
        choice = scores + self.bias.float()
        if self.groups > 1:  # DeepSeek-V3: rank groups by their two best affinities, keep top_groups of them
            grouped = choice.view(-1, self.groups, self.n_experts // self.groups)
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.top_groups, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(self.n_experts // self.groups, dim=1), -math.inf)
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.norm_top_k:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if self.training:
            with torch.no_grad():
                self.load += torch.bincount(experts.flatten(), minlength=self.n_experts).to(self.load.dtype)
        return weights * self.scale, experts, logits, scores


# ----------------------------------------------------------------------------------------------
# experts


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights: `up` [E, 2F, d] (rows [gate; up]), `down` [E, d, F]."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, std: float = 0.02, down_std: float = 0.02) -> None:
        super().__init__()
        # initialized here: Transformer.reset_parameters covers nn.Linear/nn.Embedding only
        self.up = nn.Parameter(torch.randn(n_experts, 2 * d_ff, d_model) * std)
        self.down = nn.Parameter(torch.randn(n_experts, d_model, d_ff) * down_std)

    def forward(self, xs: torch.Tensor, counts: torch.Tensor, slot: torch.Tensor, expert: torch.Tensor
                ) -> torch.Tensor:
        """Expert outputs for `xs` [M, d], rows sorted by expert (`counts` [E] rows each, `slot` = row index
        within its expert `expert`)."""
        return expert_ffn(xs, counts, slot, expert, self.up, self.down)

    def _ffn(self, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return _ffn(x, up, down)


def _ffn(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, h = torch.matmul(x, up.transpose(-1, -2)).chunk(2, dim=-1)
    return torch.matmul(F.silu(gate) * h, down.transpose(-1, -2))


def expert_ffn(xs: torch.Tensor, counts: torch.Tensor, slot: torch.Tensor, expert: torch.Tensor,
               up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts `up` [E, 2F, d], `down` [E, d, F] applied to `xs` [M, d] sorted by expert (`counts` [E]
    rows each, `slot` = row index within its expert `expert`); expert parallelism calls it on a rank's shard."""
    E = counts.shape[0]
    device = xs.device.type
    # grouped_mm is not autocast-aware: cast to the autocast dtype ourselves
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else xs.dtype
    if USE_GROUPED_MM and grouped_mm_ok(xs, up, dtype):  # one grouped GEMM per projection
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        up, down = up.to(dtype), down.to(dtype)
        gate, h = F.grouped_mm(xs.to(dtype), up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * h, down.transpose(-2, -1), offs=offs)
    capacity = int(counts.max())  # a host sync: the grouped path above avoids it
    if E * capacity <= 2 * xs.shape[0]:  # little padding: one batched matmul over [E, capacity, d]
        buf = xs.new_zeros(E, capacity, xs.shape[1])
        buf[expert, slot] = xs
        return _ffn(buf, up, down)[expert, slot]
    parts = xs.split(counts.tolist())
    return torch.cat([_ffn(p, up[e], down[e]) for e, p in enumerate(parts)])


USE_GROUPED_MM = hasattr(F, "grouped_mm")  # torch >= 2.10; tests switch it off to check the other paths


def grouped_mm_ok(xs: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> bool:
    """F.grouped_mm's constraints for computing in `dtype`: rows present, 16-byte aligned rows, and on GPUs
    bf16 (its kernels' dtype)."""
    if xs.shape[0] == 0 or xs.device.type not in ("cpu", "cuda"):
        return False
    if xs.device.type == "cuda" and dtype != torch.bfloat16:
        return False
    size = torch.empty(0, dtype=dtype).element_size()
    return all(n * size % 16 == 0 for n in w.shape[1:])


class MoE(nn.Module):
    """Routed experts (+ shared experts) replacing the dense FFN. After a training forward, `aux_loss` holds
    the weighted balance/z losses (None when all weights are 0) and `metrics` their unweighted values and the
    dropped-token fraction (read and cleared by `lmforge.train.moe_balance.MoEBalancer`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg.moe_experts, cfg.d_model, cfg.moe_d_ff, cfg.init_std,
                               cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.shared = (MLP(dataclasses.replace(cfg, d_ff=cfg.moe_d_ff * cfg.moe_shared_experts, mlp="swiglu",
                                               bias=False, preset=""))
                       if cfg.moe_shared_experts else None)
        self.aux_loss: torch.Tensor | None = None
        self.metrics: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        weights, experts, logits, scores = self.router(flat)
        out = self.dispatch(flat, weights, experts).view(B, T, d)
        if self.shared is not None:
            out = out + self.shared(x)
        self.aux_loss = self._losses(logits, scores, experts, B, T) if self.training else None
        return out

    def capacity(self, n_tokens: int) -> int:
        """Switch capacity: factor * tokens * K / E slots per expert (0 when unlimited)."""
        cf = self.cfg.moe_capacity_factor
        return math.ceil(cf * n_tokens * self.cfg.moe_top_k / self.cfg.moe_experts) if cf > 0 else 0

    def dispatch(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum_k w_k * expert_k(x) per token: sort assignments by expert, drop those past capacity (their
        token keeps only the residual, Switch section 2.2), run the experts, scatter-add back."""
        N, K = experts.shape
        E = self.cfg.moe_experts
        # choice-major (all first choices, then all second ones...) + a stable sort: within an expert, first
        # choices win capacity slots over second choices, then earlier tokens over later ones (GShard, Switch)
        ids = experts.t().flatten()
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order]
        counts = torch.bincount(ids, minlength=E)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(ids.numel(), device=ids.device) - starts[sorted_ids]
        cap = self.capacity(N)
        if cap:
            kept = slot < cap
            if self.training:
                self.metrics["moe_dropped_frac"] = 1 - kept.float().mean().detach()
            order, sorted_ids, slot = order[kept], sorted_ids[kept], slot[kept]
            counts = counts.clamp(max=cap)
        if order.numel() == 0:  # every assignment dropped
            return torch.zeros_like(flat)
        token = order % N
        ys = self.experts(flat.index_select(0, token), counts, slot, sorted_ids)
        ys = ys * weights.t().flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(flat).index_add_(0, token, ys.to(flat.dtype))

    def _losses(self, logits: torch.Tensor, scores: torch.Tensor, experts: torch.Tensor, B: int, T: int
                ) -> torch.Tensor | None:
        cfg, E = self.cfg, self.cfg.moe_experts
        terms = []
        # balance losses use normalized affinities (softmax already is; DeepSeek-V3 eq. 19 for sigmoid)
        probs = scores / scores.sum(-1, keepdim=True) if cfg.moe_router == "sigmoid" else scores
        if cfg.moe_aux_loss_weight:
            bal = load_balance_loss(probs, experts, E)
            self.metrics["moe_balance_loss"] = bal.detach()
            terms.append(cfg.moe_aux_loss_weight * bal)
        if cfg.moe_seq_aux_weight:
            seq = load_balance_loss(probs.view(B, T, E), experts.view(B, T, -1), E)
            self.metrics["moe_seq_balance_loss"] = seq.detach()
            terms.append(cfg.moe_seq_aux_weight * seq)
        if cfg.moe_z_loss_weight:
            z = router_z_loss(logits)
            self.metrics["moe_z_loss"] = z.detach()
            terms.append(cfg.moe_z_loss_weight * z)
        return sum(terms) if terms else None


def is_moe_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    return cfg.moe_experts > 0 and layer_idx >= cfg.moe_first_dense
