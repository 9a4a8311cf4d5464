"""`lmforge plan`: lay a model out over N GPUs on paper, before renting them.

For each candidate layout (data-parallel degree with a ZeRO stage, tensor, pipeline and expert degrees,
micro-batch, activation checkpointing) this predicts the memory per GPU and the communication per step, and
picks the fastest layout that fits. Pure arithmetic on a `ModelConfig`; nothing is allocated.

Memory, per GPU:
- parameters, gradients, optimizer state: mixed-precision Adam keeps bf16 parameters (2 B) and gradients (2 B)
  plus fp32 master weights and two fp32 moments (12 B): 16 bytes per parameter. ZeRO-1 shards the 12, ZeRO-2 the
  gradients too, ZeRO-3 (FSDP) also the parameters, over the data-parallel group (Rajbhandari et al., 2020).
- activations: Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer Models": one
  layer stores sbh(34 + 5as/h) bytes (GPT: MHA, GeLU MLP, dropout, attention scores materialised), divided by the
  tensor-parallel degree with sequence parallelism. lmforge's blocks differ (GQA, SwiGLU, no dropout, fused
  attention that never stores the s x s scores), so the planner counts the same way for them: see
  `activation_bytes_per_layer`. Full recomputation stores only each layer's input (2sbh / t) plus one layer's
  activations while it is recomputed. With 1F1B the first pipeline stage holds min(p, micro-batches) micro-batches.
- KV cache (inference): 2 (K and V) x layers x kv_heads x head_dim x tokens x 2 bytes (MLA: the latent and the
  shared RoPE key), split over TP (by kv heads) and PP (by layers).
- `--precision fp32` (what a CPU run does: fp32 weights, gradients and AdamW, no autocast) counts 4 + 4 + 8 bytes
  per parameter and 4-byte activations instead.

What it ignores, and says so: allocator fragmentation, temporary buffers (gathered FSDP blocks, communication
buckets, the logits' loss workspace beyond one fp32 copy), CUDA context (~0.5-1 GB), and overlap of communication
with compute (step time = compute x (1 + bubble) + every collective, i.e. pessimistic for DP/FSDP traffic).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Literal

from lmforge.core.config import option, require
from lmforge.core.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.moe import is_moe_layer
from lmforge.model.size import active_params, flops_per_token, num_params

BYTES_PARAM, BYTES_GRAD, BYTES_OPTIM = 2, 2, 12  # bf16 weights, bf16 grads, fp32 master + Adam m + v
# bytes per parameter (weights, grads, optimizer) and per activation element, by training precision
PRECISION_BYTES = {"bf16": (BYTES_PARAM, BYTES_GRAD, BYTES_OPTIM, 2),  # mixed precision: fp32 master + m + v
                   "fp32": (4, 4, 8, 4)}  # fp32 weights and grads, AdamW's fp32 m + v, fp32 activations
Precision = Literal["bf16", "fp32"]
GiB = 1024 ** 3

HONEST = ("ignores allocator fragmentation, temporary buffers (gathered FSDP blocks, comm buckets), the CUDA "
          "context, and overlap of communication with compute")


@dataclass(frozen=True)
class Layout:
    dp: int = 1  # data-parallel degree (replicas or ZeRO shards)
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert-parallel degree, carved out of dp: experts sharded over ep ranks
    zero: int = 0  # 0 = DDP, 1/2 = optimizer / + gradient sharding, 3 = FSDP (parameters too)
    micro_batch: int = 1
    checkpointing: bool = False

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp


def _expert_params(cfg: ModelConfig) -> int:
    """Parameters of the routed experts (sharded by EP); everything else is sharded by TP x PP."""
    if not cfg.moe_experts:
        return 0
    n_moe = sum(is_moe_layer(cfg, i) for i in range(cfg.n_layers + cfg.mtp_depth))
    return n_moe * cfg.moe_experts * 3 * cfg.d_model * cfg.moe_d_ff


@dataclass(frozen=True)
class Sizes:
    """What the planner needs from a config, computed once (num_params builds the model on the meta device)."""
    params: int
    experts: int
    active: int
    flops_per_token: float

    @classmethod
    def of(cls, cfg: ModelConfig, seq_len: int) -> Sizes:
        return cls(num_params(cfg), _expert_params(cfg), active_params(cfg), flops_per_token(cfg, seq_len))


def state_bytes(sizes: Sizes, layout: Layout, precision: Precision = "bf16") -> dict[str, float]:
    """Parameter, gradient and optimizer bytes one GPU holds: 2 + 2 + 12 bytes per parameter (fp32: 4 + 4 + 8),
    divided by
    TP x PP (routed experts: also by EP) and, from the ZeRO stage that shards it on, by the data-parallel
    degree (an expert is replicated dp / ep times, so its shard is experts / (tp pp dp) too)."""
    split = layout.tp * layout.pp
    local = (sizes.params - sizes.experts) / split + sizes.experts / (split * layout.ep)
    sharded = sizes.params / (split * layout.dp)

    def held(stage: int) -> float:
        return sharded if layout.zero >= stage else local
    param, grad, optim, _ = PRECISION_BYTES[precision]
    return {"params": param * held(3), "grads": grad * held(2), "optimizer": optim * held(1)}


def activation_bytes_per_layer(cfg: ModelConfig, seq_len: int, micro_batch: int, tp: int = 1,
                               paper: bool = False, precision: Precision = "bf16") -> float:
    """Bytes one block stores for backward, with sequence parallelism over `tp` ranks (everything / t).

    paper=True is Korthikanti et al. 2022 eq. (2) with sequence parallelism: sbh(34 + 5as/h) / t, for a GPT
    block (MHA, 4h GeLU MLP, dropout, materialised attention scores). The default adapts the same count to what
    lmforge's block saves for backward (bf16 activations; checked against autograd's saved tensors in
    tests/test_plan.py): each RMSNorm keeps its fp32 input and fp32 1/rms, 2 x (4sbh + 4sb); attention keeps
    its input 2sbh, the fused QKV output 2sb(q + 2kv), Q and K after RoPE 2sb(q + kv), a fp32 log-sum-exp 4sba
    and its output 2sbq (fused attention: no s x s scores); a gated MLP of width f keeps its input 2sbh, the
    fused gate/up output 2 x 2sbf, the activation and the product 2 x 2sbf (a plain MLP: 2 x 2sbf); no dropout.
    Here q = heads x head_dim and kv = kv_heads x head_dim, so GQA shrinks the K/V terms. MLA (approximate: its
    latent projections are not counted) uses per-head Q/K of nope + rope dims and the mean of K and V widths;
    MoE layers count the top-k routed plus shared experts' widths as f (tokens per expert balanced).
    precision="fp32": every activation term above is 4 bytes per element instead of 2.
    """
    s, b, h = seq_len, micro_batch, cfg.d_model
    if paper:
        return s * b * h * (34 + 5 * cfg.n_heads * s / h) / tp
    q = cfg.n_heads * cfg.head_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    if cfg.attention == "mla":
        kv = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) / 2
        q = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    a = PRECISION_BYTES[precision][3]
    norms = 2 * (4 * h + 4)
    attn = a * h + a * (q + 2 * kv) + a * (q + kv) + 4 * cfg.n_heads + a * q
    ff = cfg.moe_d_ff * (cfg.moe_top_k + cfg.moe_shared_experts) if cfg.moe_experts else cfg.d_ff
    mlp = a * h + (4 if cfg.gated_mlp else 2) * a * ff
    return s * b * (norms + attn + mlp) / tp


def activation_bytes(cfg: ModelConfig, seq_len: int, layout: Layout, precision: Precision = "bf16") -> float:
    """Activations at the peak of a step on the busier of the first pipeline stage (1F1B: p micro-batches in
    flight) and the last (one micro-batch plus the fp32 logits, split over TP)."""
    layers = math.ceil(cfg.n_layers / layout.pp)
    per_layer = activation_bytes_per_layer(cfg, seq_len, layout.micro_batch, layout.tp, precision=precision)
    if layout.checkpointing:  # keep each block's input; recompute one block at a time in backward
        stored = layers * PRECISION_BYTES[precision][3] * seq_len * layout.micro_batch * cfg.d_model / layout.tp
        first, last = stored * layout.pp + per_layer, stored + per_layer
    else:
        first, last = layers * per_layer * layout.pp, layers * per_layer
    logits = 4 * seq_len * layout.micro_batch * cfg.vocab_size / layout.tp
    return max(first, last + logits)


def kv_cache_bytes(cfg: ModelConfig, tokens: int, tp: int = 1, pp: int = 1) -> float:
    """Inference KV cache for `tokens` cached tokens, bf16, per GPU of a TP x PP layout."""
    layers = math.ceil(cfg.n_layers / pp)
    if cfg.attention == "mla":
        return 2 * layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * tokens  # latent is not split by heads
    return 2 * 2 * layers * cfg.n_kv_heads * cfg.head_dim * tokens / min(tp, cfg.n_kv_heads)


def _ring(n: int) -> float:
    """Bytes each rank sends per byte of an all-reduce over n ranks (ring): 2(n-1)/n."""
    return 2 * (n - 1) / n


def comm_bytes(cfg: ModelConfig, sizes: Sizes, seq_len: int, global_batch: int, layout: Layout,
               precision: Precision = "bf16") -> dict[str, float]:
    """Bytes each GPU sends per optimizer step, by kind of collective (ring algorithms)."""
    grad_bytes, elem = PRECISION_BYTES[precision][1], PRECISION_BYTES[precision][3]
    local = sizes.params / (layout.tp * layout.pp)
    n_micro = global_batch // (layout.dp * layout.micro_batch)
    layers = math.ceil(cfg.n_layers / layout.pp)
    act = elem * seq_len * layout.micro_batch * cfg.d_model  # one [b, s, h] activation tensor
    # DDP/ZeRO-1/2: an all-reduce (= reduce-scatter + all-gather) of bf16 grads; ZeRO-3 adds a second
    # all-gather of the parameters in backward: 3 x (n-1)/n instead of 2 x (n-1)/n.
    dp_factor = _ring(layout.dp) * (1.5 if layout.zero == 3 else 1.0)
    dp = dp_factor * grad_bytes * local
    # TP (Megatron + sequence parallelism): per block, 2 all-gather + 2 reduce-scatter forward, as many
    # backward, each moving act x (t-1)/t; recomputation repeats the forward ones.
    passes = 3 if layout.checkpointing else 2
    tp = 2 * passes * _ring(layout.tp) * act * layers * n_micro
    pp = (2 * act / layout.tp) * n_micro if layout.pp > 1 else 0.0  # one activation forward, one grad back
    ep = 0.0
    if layout.ep > 1 and cfg.moe_experts:  # dispatch + combine, forward and backward
        n_moe = sum(is_moe_layer(cfg, i) for i in range(cfg.n_layers)) / layout.pp  # a stage's average share
        ep = 4 * act * cfg.moe_top_k * (layout.ep - 1) / layout.ep * n_moe * n_micro / layout.tp
    return {"dp": dp, "tp": tp, "pp": pp, "ep": ep}


@dataclass
class PlanConfig:
    model: ModelConfig = option(default_factory=ModelConfig, help="model architecture (e.g. --model.preset)")
    # the cluster
    gpus: int = option(8, "GPUs to lay the model out over")
    gpus_per_node: int = option(8, "GPUs per node: TP stays inside one")
    gpu_memory: float = option(80.0, "memory per GPU in GiB")
    # the workload
    seq_len: int = option(4096, "training sequence length (also the KV-cache length reported)")
    global_batch: int = option(512, "sequences per optimizer step")
    precision: Precision = option("bf16", "bf16: mixed-precision AdamW (2 + 2 + 12 B/param, bf16 activations); "
                                  "fp32: fp32 weights, grads and AdamW (4 + 4 + 8 B/param, fp32 activations)")
    # the speeds the step time is predicted from
    gpu_tflops: float = option(400.0, "sustained bf16 TFLOP/s per GPU (H100 SXM peak is ~989 dense)")
    intra_node_gbps: float = option(450.0, "GB/s per GPU inside a node (NVLink)")
    inter_node_gbps: float = option(50.0, "GB/s per GPU between nodes (InfiniBand/RoCE, 400 Gb/s = 50 GB/s)")
    # the output
    top: int = option(15, help="rows of the table to print")
    json: bool = option(False, help="print every evaluated layout as JSON instead of a table")

    def __post_init__(self) -> None:
        for key in ("gpus", "seq_len", "global_batch", "gpus_per_node", "top"):
            require(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")
        for key in ("gpu_memory", "gpu_tflops", "intra_node_gbps", "inter_node_gbps"):
            require(getattr(self, key) > 0, key, getattr(self, key), "> 0")
        require(self.model.vocab_size >= 1, "model.vocab_size", self.model.vocab_size,
                ">= 1 (a preset without a tokenizer needs --model.vocab_size)")


def evaluate(layout: Layout, setup: PlanConfig, sizes: Sizes | None = None) -> dict:
    """Memory (GiB per GPU), communication (GB per GPU per step) and predicted step time of one layout."""
    hw = setup  # the cluster and its speeds
    cfg, seq_len, global_batch = setup.model, setup.seq_len, setup.global_batch
    sizes = sizes or Sizes.of(cfg, seq_len)
    state = state_bytes(sizes, layout, setup.precision)
    acts = activation_bytes(cfg, seq_len, layout, setup.precision)
    mem = {**state, "activations": acts}
    total = sum(mem.values())
    comm = comm_bytes(cfg, sizes, seq_len, global_batch, layout, setup.precision)
    tokens = global_batch * seq_len
    n_micro = global_batch // (layout.dp * layout.micro_batch)
    recompute = 8 / 6 if layout.checkpointing else 1.0  # one more forward (2 of the 6 FLOPs per param-token)
    flops = sizes.flops_per_token * tokens / layout.gpus * recompute
    bubble = (layout.pp - 1) / n_micro
    compute_s = flops / (hw.gpu_tflops * 1e12) * (1 + bubble)
    intra, inter = hw.intra_node_gbps * 1e9, hw.inter_node_gbps * 1e9
    tp_bw = intra if layout.tp <= hw.gpus_per_node else inter
    dp_bw = intra if layout.tp * layout.dp <= hw.gpus_per_node and layout.pp == 1 else inter
    pp_bw = intra if layout.gpus <= hw.gpus_per_node else inter
    ep_bw = intra if layout.tp * layout.ep <= hw.gpus_per_node else inter
    comm_s = comm["dp"] / dp_bw + comm["tp"] / tp_bw + comm["pp"] / pp_bw + comm["ep"] / ep_bw
    step_s = compute_s + comm_s
    return {"layout": asdict(layout), "fits": total <= hw.gpu_memory * GiB,
            "memory_gib": {k: v / GiB for k, v in {**mem, "total": total}.items()},
            "comm_gb": {k: v / 1e9 for k, v in comm.items()}, "micro_batches": n_micro, "bubble": bubble,
            "step_s": step_s, "tokens_per_s": tokens / step_s,
            "kv_cache_gib_per_seq": kv_cache_bytes(cfg, seq_len, layout.tp, layout.pp) / GiB}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: ModelConfig, gpus: int, global_batch: int, gpus_per_node: int) -> list[Layout]:
    """Every layout of exactly `gpus` GPUs: TP within a node dividing the heads, PP up to the layer count,
    EP dividing DP and the expert count, ZeRO 0-3, micro-batches 1-8 that divide the per-replica batch."""
    out = []
    for tp in _divisors(gpus):
        if tp > gpus_per_node or cfg.n_heads % tp:
            continue
        for pp in _divisors(gpus // tp):
            if pp > cfg.n_layers:
                continue
            dp = gpus // (tp * pp)
            if global_batch % dp:
                continue
            eps = [e for e in _divisors(dp) if cfg.moe_experts % e == 0] if cfg.moe_experts else [1]
            for ep in eps:
                for zero in (0, 1, 2, 3):
                    if dp == 1 and zero:
                        continue
                    for mb in (1, 2, 4, 8):
                        if (global_batch // dp) % mb:
                            continue
                        for ac in (False, True):
                            out.append(Layout(dp, tp, pp, ep, zero, mb, ac))
    return out


def plan(setup: PlanConfig) -> list[dict]:
    """Every candidate layout evaluated, sorted: the ones that fit first, fastest first."""
    sizes = Sizes.of(setup.model, setup.seq_len)
    rows = [evaluate(lay, setup, sizes)
            for lay in candidates(setup.model, setup.gpus, setup.global_batch, setup.gpus_per_node)]
    return sorted(rows, key=lambda r: (not r["fits"], -r["tokens_per_s"], r["memory_gib"]["total"]))


def _row(r: dict) -> str:
    lay, m = r["layout"], r["memory_gib"]
    name = f"dp{lay['dp']} tp{lay['tp']} pp{lay['pp']}" + (f" ep{lay['ep']}" if lay["ep"] > 1 else "")
    return (f"{name:<20} {lay['zero']:>4} {lay['micro_batch']:>3} {'yes' if lay['checkpointing'] else 'no':>3} "
            f"{m['params']:>7.1f} {m['grads']:>7.1f} {m['optimizer']:>7.1f} {m['activations']:>7.1f} "
            f"{m['total']:>7.1f} {'yes' if r['fits'] else 'NO':>4} {sum(r['comm_gb'].values()):>8.1f} "
            f"{r['tokens_per_s']:>10.0f}")


def plan_cmd(cfg: PlanConfig) -> int:
    """Print the candidate layouts, best first, and the pick; exit 1 when nothing fits."""
    rows = plan(cfg)
    best = rows[0] if rows and rows[0]["fits"] else None
    if cfg.json:
        print(json.dumps({"params": num_params(cfg.model), "active_params": active_params(cfg.model),
                          "best": best, "layouts": rows, "ignores": HONEST}, indent=1))
    else:
        print(f"{num_params(cfg.model) / 1e9:.2f}B parameters on {cfg.gpus} x {cfg.gpu_memory:g} GiB, seq "
              f"{cfg.seq_len}, {cfg.global_batch} sequences/step; memory in GiB per GPU, comm in GB per GPU "
              f"per step ({HONEST})")
        print(f"{'layout':<20} {'zero':>4} {'mb':>3} {'ac':>3} {'params':>7} {'grads':>7} {'optim':>7} "
              f"{'acts':>7} {'total':>7} {'fits':>4} {'comm':>8} {'tokens/s':>10}")
        for r in rows[:cfg.top]:
            print(_row(r))
    if not rows:
        raise LmforgeError(f"no layout of {cfg.gpus} GPUs divides the heads ({cfg.model.n_heads}, TP within "
                           f"{cfg.gpus_per_node} GPUs per node), layers and global batch ({cfg.global_batch})")
    if best is None:
        need = min(r["memory_gib"]["total"] for r in rows)
        raise LmforgeError(f"no layout fits {cfg.gpu_memory:g} GiB (the smallest needs {need:.1f} GiB)")
    if not cfg.json:
        lay = best["layout"]
        print(f"best: dp{lay['dp']} tp{lay['tp']} pp{lay['pp']} ep{lay['ep']} zero{lay['zero']} micro-batch "
              f"{lay['micro_batch']} checkpointing {'on' if lay['checkpointing'] else 'off'}: "
              f"{best['memory_gib']['total']:.1f} GiB/GPU, {best['tokens_per_s']:.0f} tokens/s predicted")
    return 0
