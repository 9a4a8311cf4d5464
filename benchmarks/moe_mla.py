"""MoE and MLA: lmforge's DeepSeekMoE layer vs HF transformers' DeepseekV3MoE on the same weights and input,
a dense model vs an MoE with the same active parameters, and MLA vs GQA of the same size.

- MoE layer: forward + backward time of `lmforge.model.moe.MoE` and `DeepseekV3MoE` (HF's expert loop,
  `experts_implementation="eager"`, and its default `grouped_mm`), outputs checked equal first.
- dense vs MoE: training tokens/s (forward, LM loss + aux losses, backward, AdamW) and memory of `tiny` vs
  `moe-tiny` (same width/depth and active FFN size); memory is the CUDA peak on a GPU, else the bytes of
  parameters + gradients + AdamW state.
- MLA vs GQA: KV-cache bytes per token (bf16) and greedy decode tokens/s of `mla-tiny` vs `tiny` through the
  generation engine (batch 1 and a batch of 16).

    .venv/bin/python benchmarks/moe_mla.py            # CPU, a few minutes
    .venv/bin/python benchmarks/moe_mla.py --device cuda --dtype bfloat16
    .venv/bin/python benchmarks/moe_mla.py --only moe_layer --threads 1   # the MoE layer rows alone

Every row is also appended to benchmarks/RESULTS.md. The MoE layer on CPU is GEMM-bound: the profile
(torch.profiler) puts 66-73 % of its fwd+bwd in the per-expert matmuls that grouped_mm runs on CPU, the same
ones in lmforge and in HF, so the ratio to HF's grouped_mm path is bounded by the rest (routing, gather/scatter,
SiLU-gate). The last MoE row times those matmuls alone at the routed row counts (`gemm_floor_seconds`, warm
operands): the time no implementation of the layer goes below here.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import torch
from common import append_results, interleaved, machine_line, table

from lmforge.core.config import from_dict
from lmforge.generate.batch import generate_batch
from lmforge.model import ModelConfig, Transformer
from lmforge.model.mla import mla_cache_bytes_per_token
from lmforge.model.moe import MoE
from lmforge.model.size import active_params
from lmforge.train.pretrain import lm_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed(fns: list, device: str, reps: int, warmup: int = 2) -> list[float]:
    """Median seconds of each fn, the fns interleaved (see `common.interleaved`)."""
    return list(interleaved(dict(enumerate(fns)), reps, warmup, device)[0].values())


# ----------------------------------------------------------------------------------------------
# MoE layer vs HF DeepseekV3MoE


def moe_layer_pair(args: argparse.Namespace) -> tuple[MoE, torch.nn.Module]:
    """The same DeepSeekMoE layer twice: lmforge's and HF's, with HF's weights copied into ours."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    d, E, K, F_, S, G, TG = args.d_model, args.experts, args.top_k, args.expert_d_ff, 2, 8, 4
    hf_cfg = DeepseekV3Config(hidden_size=d, moe_intermediate_size=F_, n_routed_experts=E, num_experts_per_tok=K,
                              n_shared_experts=S, n_group=G, topk_group=TG, routed_scaling_factor=2.5)
    torch.manual_seed(0)
    hf = DeepseekV3MoE(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05)
        hf.gate.e_score_correction_bias.normal_(0, 0.05)
    cfg = ModelConfig(d_model=d, n_heads=4, n_layers=1, moe_experts=E, moe_top_k=K, moe_shared_experts=S,
                      moe_d_ff=F_, moe_router="sigmoid", moe_norm_top_k=True, moe_routed_scale=2.5, moe_groups=G,
                      moe_top_groups=TG)
    ours = MoE(cfg)
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.router.bias.copy_(hf.gate.e_score_correction_bias)
        ours.experts.up.copy_(hf.experts.gate_up_proj)
        ours.experts.down.copy_(hf.experts.down_proj)
        sh = hf.shared_experts
        ours.shared.up.weight.copy_(torch.cat([sh.gate_proj.weight, sh.up_proj.weight]))
        ours.shared.down.weight.copy_(sh.down_proj.weight)
    dtype = DTYPES[args.dtype]
    return ours.to(args.device, dtype), hf.to(args.device, dtype)


def gemm_floor_seconds(layer: MoE, x: torch.Tensor, reps: int = 3) -> float:
    """Seconds of the layer's fwd+bwd matmuls run alone, nothing else: for every routed expert, at the number of
    rows the router sends it, and for the shared experts at all rows, the forward gate/up and down products and
    both gradients of each (input and weight): 6 GEMMs each, each the median of `reps` as the layers are. No
    implementation of this layer, HF's or ours, can take less on this machine with these kernels."""
    flat = x.detach().reshape(-1, x.shape[-1])
    with torch.no_grad():
        experts = layer.router(flat)[1]
    rows = torch.bincount(experts.flatten(), minlength=layer.cfg.moe_experts).tolist()
    d, f = layer.cfg.d_model, layer.cfg.moe_d_ff
    mlps = [(n, f) for n in rows if n] + ([(len(flat), f * layer.cfg.moe_shared_experts)] if layer.shared else [])
    kw = dict(device=x.device, dtype=x.dtype)
    total = 0.0
    for n, hidden in mlps:
        for m, k, o in ((n, d, 2 * hidden), (n, hidden, d),  # forward: gate/up, down
                        (n, 2 * hidden, d), (d, n, 2 * hidden),  # gate/up: input and weight gradients
                        (n, d, hidden), (hidden, n, d)):  # down: input and weight gradients
            a, b = torch.randn(m, k, **kw), torch.randn(k, o, **kw)
            total += timed([functools.partial(torch.matmul, a, b)], x.device.type, reps, warmup=1)[0]
    return total


def moe_layer_rows(args: argparse.Namespace) -> list[tuple[str, float, float, str]]:
    ours, hf = moe_layer_pair(args)
    x = torch.randn(args.batch, args.seq_len, args.d_model, device=args.device, dtype=DTYPES[args.dtype])
    x.requires_grad_(True)

    def step(layer: torch.nn.Module) -> None:
        layer(x).float().square().mean().backward()

    rows = []
    for impl in ("eager", "grouped_mm"):
        hf.config._experts_implementation = impl
        with torch.no_grad():
            diff = (ours(x) - hf(x)).abs().max().item()
        tol = 1e-4 if args.dtype == "float32" else 5e-2
        if diff > tol:
            raise SystemExit(f"MoE outputs differ from HF ({impl}) by {diff:.2e}")
        t_ours, t_hf = timed([lambda: step(ours), lambda: step(hf)], args.device, args.reps)
        what = "expert loop" if impl == "eager" else "grouped_mm, HF default"
        rows.append((f"MoE layer fwd+bwd ms, {args.experts} experts top-{args.top_k} + 2 shared, "
                     f"{args.batch * args.seq_len} tokens (vs HF DeepseekV3MoE, {what})",
                     t_ours * 1e3, t_hf * 1e3, "peer/lmforge"))
    floor = gemm_floor_seconds(ours, x)
    rows.append(("MoE layer fwd+bwd ms: its expert and shared-expert matmuls alone, the floor of any "
                 "implementation (vs HF grouped_mm; the ratio is the most any MoE layer can gain over it here)",
                 floor * 1e3, t_hf * 1e3, "peer/lmforge"))
    return rows


# ----------------------------------------------------------------------------------------------
# dense vs MoE with the same active parameters


def model(preset: str, args: argparse.Namespace) -> Transformer:
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"preset": preset, "vocab_size": args.vocab}, "model.")
    return Transformer(cfg).to(args.device)


def train_step(preset: str, args: argparse.Namespace):
    """A full training step of `preset` (forward, LM + aux losses, backward, AdamW) and its model."""
    m = model(preset, args).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=args.device)
    batch = (x[:, :-1], x[:, 1:])

    def step() -> None:
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            loss, _ = lm_loss(m, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, m


def peak_memory(step, device: str) -> float:
    """Peak CUDA MiB of one more step (after warm-up steps built the optimizer state)."""
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated() / 2**20


def train_rows(args: argparse.Namespace) -> list[tuple[str, float, float, str]]:
    (moe_step, moe), (dense_step, dense) = train_step("moe-tiny", args), train_step("tiny", args)
    t_moe, t_dense = timed([moe_step, dense_step], args.device, args.reps)
    tokens = args.batch * args.seq_len
    n_moe, n_dense = (sum(p.numel() for p in m.parameters()) for m in (moe, dense))
    if args.device == "cuda":
        mem, mem_moe, mem_dense = "peak CUDA MiB", peak_memory(moe_step, "cuda"), peak_memory(dense_step, "cuda")
    else:  # fp32 parameters + gradients + two AdamW moments
        mem, mem_moe, mem_dense = "MiB params+grads+AdamW", 16 * n_moe / 2**20, 16 * n_dense / 2**20
    return [("train tokens/s: moe-tiny (8 experts top-2) vs dense tiny, same active params", tokens / t_moe,
             tokens / t_dense, "lmforge/peer"),
            (f"train memory ({mem}): moe-tiny vs tiny", mem_moe, mem_dense, "lmforge/peer"),
            ("total params (M): moe-tiny vs tiny", n_moe / 1e6, n_dense / 1e6, "lmforge/peer"),
            ("active params per token (M): moe-tiny vs tiny", active_params(moe.cfg) / 1e6,
             active_params(dense.cfg) / 1e6, "lmforge/peer")]


# ----------------------------------------------------------------------------------------------
# MLA vs GQA


def decode_rows(args: argparse.Namespace) -> list[tuple[str, float, float, str]]:
    from lmforge.generate.sampling import SamplingParams

    rows = []
    mla_cfg = from_dict(ModelConfig, {"preset": "mla-tiny", "vocab_size": args.vocab}, "model.")
    gqa_cfg = from_dict(ModelConfig, {"preset": "tiny", "vocab_size": args.vocab}, "model.")
    rows.append(("KV-cache bytes/token (bf16): mla-tiny (latent 64 + rope key 16) vs tiny GQA (4 KV heads x 32)",
                 mla_cache_bytes_per_token(mla_cfg), mla_cache_bytes_per_token(gqa_cfg), "lmforge/peer"))
    params = SamplingParams(greedy=True, max_new_tokens=args.new_tokens)
    for batch in (1, 16):
        prompts = [[(7 * i + j) % args.vocab for j in range(16)] for i in range(batch)]
        runs = [functools.partial(generate_batch, model(preset, args).eval().to(DTYPES[args.dtype]), prompts, params)
                for preset in ("mla-tiny", "tiny")]
        t_mla, t_gqa = timed(runs, args.device, max(2, args.reps // 2), 1)
        rows.append((f"decode tokens/s, batch {batch}, {args.new_tokens} new tokens: mla-tiny vs tiny GQA",
                     batch * args.new_tokens / t_mla, batch * args.new_tokens / t_gqa, "lmforge/peer"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=6)
    parser.add_argument("--expert_d_ff", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--only", choices=["all", "moe_layer"], default="all")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    machine = machine_line(args.device, extra=f"{args.dtype}, load average {load:.1f} at start")
    command = "python benchmarks/moe_mla.py " + " ".join(sys.argv[1:])
    rows = moe_layer_rows(args)
    if args.only == "all":
        rows += train_rows(args) + decode_rows(args)
    cells = []
    for figure, ours, peer, kind in rows:
        ratio = peer / ours if kind == "peer/lmforge" else ours / peer
        cells.append((figure, f"{ours:,.1f}", f"{peer:,.1f}", f"{ratio:.2f}x ({kind})"))
    print(table(cells, machine, command.strip()))
    append_results(Path(args.results), cells, machine, command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
