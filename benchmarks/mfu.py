"""Model FLOPs utilization of lmforge training on one GPU: ~124M and ~350M GPT shapes, bf16 + torch.compile.

Each step is lmforge's own training step (`forward_backward` with the pretraining loss `lm_loss`, the LM head
fused with the cross-entropy, then `optimizer_step`: grad clipping + fused AdamW, fp32 master weights under
bf16 autocast). The peer is the same step without torch.compile (eager), measured in the same run.

MFU = model FLOPs/s / peak (PaLM, Chowdhery et al. 2022, appendix B): per token 6*N + 12*L*d*T, with N the
weights of all matmuls (every nn.Linear, the LM head included, embedding lookups excluded), L layers, d the
width and T the sequence length (attention scores and values, no causal discount). Peak: 989e12 (H100 SXM
bf16 dense; --peak-flops for other parts).

Then a paper estimate for 8 and 64 GPUs with FSDP (ZeRO-3) from the measured single-GPU figure: per
micro-batch each GPU all-gathers the bf16 parameters twice (forward, and again in backward after
resharding) and reduce-scatters bf16 gradients: 3 * 2P * (n-1)/n bytes through the ring. Bandwidth
assumptions (NCCL bus bandwidth per GPU): 360 GB/s in one 8-GPU NVLink node; 40 GB/s across nodes
(8 x 400 Gb/s InfiniBand per 8-GPU node, ~80 % achieved). Overlapped: tokens/s = n * B*T / max(t_compute,
t_comm); not overlapped: n * B*T / (t_compute + t_comm).

    python benchmarks/mfu.py                 # on a CUDA machine: both models, < 4 minutes on an H100
    python benchmarks/mfu.py --smoke         # anywhere: a tiny model, a few steps (checks the script)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import machine_line, report, script_command, sync
from torch import nn

from lmforge.core.config import from_dict
from lmforge.core.runtime import compile_model
from lmforge.model import ModelConfig, Transformer
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizer
from lmforge.train.pretrain import lm_loss, lm_loss_unfused
from lmforge.train.trainer import forward_backward, optimizer_step

H100_BF16_DENSE = 989e12
GPT = dict(mlp="gelu", norm="layernorm", position="learned", tie_embeddings=True, vocab_size=50304, max_seq_len=1024)
MODELS = {  # GPT-2 small and medium shapes (Radford et al. 2019); vocab padded to a multiple of 128
    "124M": (dict(GPT, d_model=768, n_layers=12, n_heads=12, d_ff=3072), 32),
    "350M": (dict(GPT, d_model=1024, n_layers=24, n_heads=16, d_ff=4096), 16),
    "smoke": (dict(GPT, d_model=64, n_layers=2, n_heads=4, d_ff=256, vocab_size=256, max_seq_len=64), 4),
}
BANDWIDTH = {8: ("1 node, NVLink, 360 GB/s", 360e9), 64: ("8 nodes, 8x400 Gb/s IB per node, 40 GB/s", 40e9)}


def matmul_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(model: Transformer, seq_len: int) -> float:
    cfg = model.cfg
    return 6 * matmul_weights(model) + 12 * cfg.n_layers * cfg.d_model * seq_len


class RandomTokens:
    """Fresh random (inputs, targets) on the device each step; content does not change the FLOPs."""

    def __init__(self, batch: int, seq_len: int, vocab: int, device: torch.device) -> None:
        self.shape, self.vocab, self.device = (batch, seq_len + 1), vocab, device

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.vocab, self.shape, device=self.device)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def measure(name: str, batch: int, device: torch.device, precision: str, compiled: bool, steps: int,
            warmup: int, loss_fn=lm_loss) -> dict:
    """tokens/s of `steps` lmforge training steps after `warmup` (compilation happens there)."""
    shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = Transformer(from_dict(ModelConfig, shape)).to(device).train()
    seq_len = model.cfg.max_seq_len
    cfg = TrainConfig(lr=1e-4)
    optimizer = build_optimizer(model, cfg)
    run = compile_model(model) if compiled else model
    data = RandomTokens(batch, seq_len, model.cfg.vocab_size, device)
    for _ in range(warmup):
        forward_backward(run, loss_fn, data, 1, device, precision)
        optimizer_step(model, optimizer, cfg.grad_clip)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        stats = forward_backward(run, loss_fn, data, 1, device, precision)
        optimizer_step(model, optimizer, cfg.grad_clip)
    sync(device)
    seconds = time.perf_counter() - start
    tps = batch * seq_len * steps / seconds
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    out = {"tokens_per_s": tps, "flops_per_token": flops_per_token(model, seq_len), "params": model.num_params(),
           "batch": batch, "seq_len": seq_len, "loss": stats.loss, "peak_gib": mem}
    del run, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def measure_fitting(name: str, batch: int, *args) -> dict:
    """Halve the micro-batch on out-of-memory (a smaller GPU than the H100 this was sized for)."""
    while True:
        try:
            return measure(name, batch, *args)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()
            print(f"{name}: out of memory, retrying with micro-batch {batch}", file=sys.stderr)


def fsdp_estimate(r: dict, n: int) -> tuple[float, float, float]:
    """(overlapped, serial) tokens/s on n GPUs, and t_comm/t_compute, for the measured micro-batch."""
    tokens = r["batch"] * r["seq_len"]
    t_compute = tokens / r["tokens_per_s"]
    t_comm = 3 * 2 * r["params"] * (n - 1) / n / BANDWIDTH[n][1]
    return n * tokens / max(t_compute, t_comm), n * tokens / (t_compute + t_comm), t_comm / t_compute


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="124M,350M", help="comma-separated: 124M, 350M")
    ap.add_argument("--steps", type=int, default=10, help="measured steps per model")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (compilation happens here)")
    ap.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE, help="dense bf16 peak of the device")
    ap.add_argument("--micro-batch", type=int, default=0, help="sequences per step for every model (default: "
                                                               "32 for 124M, 16 for 350M; halved on OOM)")
    ap.add_argument("--loss", choices=["fused", "unfused"], default="fused",
                    help="LM head + cross-entropy chunked (train.fused_ce, the default) or on full logits")
    ap.add_argument("--no-peer", action="store_true", help="skip the eager (uncompiled) peer runs")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on any device (CPU included), 2 steps")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("skip: benchmarks/mfu.py measures a GPU (needs CUDA); run with --smoke to check it on this CPU")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    models = ["smoke"] if args.smoke else args.models.split(",")
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    precision = "bf16"
    machine = machine_line(device, extra="" if cuda else "smoke")
    command = script_command()
    rows, measured = [], {}
    for name in models:
        batch = args.micro_batch or MODELS[name][1]
        t0 = time.perf_counter()
        compiled = cuda or not args.smoke  # CPU smoke runs stay eager: inductor on CPU costs minutes to build
        loss_fn = lm_loss if args.loss == "fused" else lm_loss_unfused
        ours = measure_fitting(name, batch, device, precision, compiled, steps, warmup, loss_fn)
        peer = None if args.no_peer else measure_fitting(name, ours["batch"], device, precision, False, steps,
                                                         warmup, loss_fn)
        measured[name] = ours
        mfu = ours["tokens_per_s"] * ours["flops_per_token"] / args.peak_flops
        print(f"{name}: {ours['params'] / 1e6:.0f}M params, micro-batch {ours['batch']}x{ours['seq_len']}, "
              f"{ours['tokens_per_s']:,.0f} tokens/s, MFU {mfu:.1%}, peak mem {ours['peak_gib']:.1f} GiB, "
              f"loss {ours['loss']:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        ptps = peer["tokens_per_s"] if peer else float("nan")
        pmfu = ptps * ours["flops_per_token"] / args.peak_flops
        mode = "compiled" if compiled else "eager"
        rows.append((f"{name} tokens/s (bf16, {mode} vs eager)", f"{ours['tokens_per_s']:,.0f}", f"{ptps:,.0f}",
                     f"{ours['tokens_per_s'] / ptps:.2f}"))
        rows.append((f"{name} MFU (6N+12LdT per token / {args.peak_flops:.3g})", f"{mfu:.2%}", f"{pmfu:.2%}",
                     f"{mfu / pmfu:.2f}"))
    limit = f"dense bf16 peak {args.peak_flops / 1e12:.0f} TFLOP/s (--peak-flops), held against in the MFU rows"
    report([(fig, a, f"{b} (eager)", ratio) for fig, a, b, ratio in rows], machine, command, limit,
           append=cuda)  # a CPU smoke run checks the script, it measures nothing
    print()
    print("FSDP paper estimate from the measured single-GPU tokens/s (3 x 2P bytes per GPU per micro-batch):")
    print()
    print("| model | GPUs | bandwidth assumption | comm / compute | tokens/s (overlapped) | tokens/s (serial) "
          "| scaling vs 1 GPU |")
    print("|---|---|---|---|---|---|---|")
    for name, r in measured.items():
        for n in (8, 64):
            over, serial, ratio = fsdp_estimate(r, n)
            print(f"| {name} | {n} | {BANDWIDTH[n][0]} | {ratio:.2f} | {over:,.0f} | {serial:,.0f} | "
                  f"{over / r['tokens_per_s']:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
