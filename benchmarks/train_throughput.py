"""Training throughput: lmforge vs HF transformers LlamaForCausalLM, same config, data, optimizer, threads.

Measures tokens/s of full training steps (forward, loss, backward, AdamW step) for fp32 and bf16
autocast: lmforge through the trainer's own loss (`lm_loss`: LM head fused with the cross-entropy) and
compile path (`compile_model`), HF through its logits, both with `build_optimizer`'s AdamW. Reports each
whole step's achieved FLOP/s as a fraction of this machine's matmul peak at the same precision (the peer's
fraction bounds any speed-up), measured in the same run (`common.matmul_peaks`, ~1 s per dtype), and, in fp32, against
the rate this shape's own weight matmuls reach when run alone (`gemm_floor`: a d256 model's small inner dimension
keeps its GEMMs below the square-matmul peak, so no step of that shape reaches the peak), and appends
its table to benchmarks/RESULTS.md. bf16 rows are skipped, saying why, on a CPU whose bf16 matmuls are slower
than fp32's (no AVX-512-BF16 or AMX).

    .venv/bin/python benchmarks/train_throughput.py --preset tiny --steps 8
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import (
    bf16_skip_reason,
    machine_line,
    matmul_peak,
    matmul_peaks,
    matmul_seconds,
    peak_line,
    report,
    script_command,
    training_step,
)

from lmforge.core.config import from_dict
from lmforge.core.runtime import compile_model
from lmforge.model import ModelConfig, Transformer
from lmforge.model.size import flops_per_token, num_params

SHAPES = {
    # the DESIGN.md reference shapes
    "tiny": dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=688, vocab_size=32000, seq_len=256, batch=16),
    "small": dict(d_model=768, n_layers=4, n_heads=12, n_kv_heads=12, d_ff=2048, vocab_size=32000, seq_len=512,
                  batch=8),
}


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                         initializer_range=cfg.init_std)
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def measure(model: torch.nn.Module, is_hf: bool, precision: str, batch: int, seq_len: int, vocab: int, steps: int,
            warmup: int) -> tuple[float, float]:
    """Training tokens per second and per CPU-second of `model` (an lmforge model, compiled or not, or HF's)
    after `warmup` steps."""
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    step = training_step(model, data[:, :-1], data[:, 1:], precision, hf=is_hf)
    for _ in range(warmup):
        step()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    tokens = batch * seq_len * steps
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)


def gemm_floor(model: torch.nn.Module, tokens: int, clock: Callable[[], float] = time.process_time,
               reps: int = 2) -> tuple[float, float]:
    """(seconds, FLOPs) of one fp32 training step's weight matmuls run alone at this model's shapes: for every
    `nn.Linear` (weight [out, in]) the forward [T, in] @ [in, out], the input gradient [T, out] @ [out, in] and
    the weight gradient [in, T] @ [T, out], T = `tokens`; each shape timed once (fastest of `reps`). Small inner
    dimensions run below the square-matmul peak, so this is the limit a step of this shape can reach; a step's
    attention scores, norms and loss come on top of it."""
    seconds, flops, cache = 0.0, 0.0, {}
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        n_out, n_in = module.weight.shape
        for m, k, n in ((tokens, n_in, n_out), (tokens, n_out, n_in), (n_in, tokens, n_out)):
            if (m, k, n) not in cache:
                a, b = torch.randn(m, k), torch.randn(k, n)
                a @ b  # warm-up
                cache[(m, k, n)] = matmul_seconds(a, b, reps, clock)
            seconds, flops = seconds + cache[(m, k, n)], flops + 2 * m * k * n
    return seconds, flops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(SHAPES), default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = ap.parse_args()

    shape = dict(SHAPES[args.preset])
    batch, seq_len = shape.pop("batch"), shape.pop("seq_len")
    cfg = from_dict(ModelConfig, {**shape, "max_seq_len": seq_len})
    flops = flops_per_token(cfg, seq_len)
    threads = torch.get_num_threads()
    peaks = matmul_peaks()
    cpu_peak = {"fp32": matmul_peak(torch.float32, clock=time.process_time)}  # per CPU-second: steadier under load
    print(f"threads={threads}  {peak_line(peaks)} (fp32 per CPU-second {cpu_peak['fp32'] / 1e9:.0f})  "
          f"params {num_params(cfg) / 1e6:.1f}M  FLOPs/token {flops / 1e6:.1f}M")
    floor_s, floor_flops = gemm_floor(Transformer(cfg), batch * seq_len)
    floor_rate = floor_flops / floor_s  # FLOP per CPU-second of this shape's weight matmuls alone
    print(f"GEMM floor: this shape's weight matmuls alone run at {floor_rate / cpu_peak['fp32']:.1%} of the fp32 "
          f"peak per CPU-second (small inner dimensions run below the square-matmul peak)")
    precisions = args.precisions.split(",")
    if "bf16" in precisions and bf16_skip_reason(peaks):
        print(bf16_skip_reason(peaks))
        precisions.remove("bf16")

    rows = []
    for precision in precisions:
        torch.manual_seed(0)
        hf = hf_model(cfg)
        hf_tps, hf_cpu = measure(hf, True, precision, batch, seq_len, cfg.vocab_size, args.steps, args.warmup)
        del hf
        variants = [("eager", False)] + ([] if args.no_compile else [("compiled", True)])
        for label, compiled in variants:
            torch.manual_seed(0)
            model = Transformer(cfg)
            runner = compile_model(model) if compiled else model
            tps, tps_cpu = measure(runner, False, precision, batch, seq_len, cfg.vocab_size, args.steps,
                          args.warmup + (2 if compiled else 0))
            # the whole step's FLOP/s against this precision's matmul ceiling; the peer's fraction bounds any ratio
            of_peak, hf_of_peak = tps * flops / peaks[precision], hf_tps * flops / peaks[precision]
            # the same per CPU-second (fp32): what load from other processes changes least
            cpu_note = (f"; per CPU-second {tps_cpu * flops / cpu_peak['fp32']:.1%} vs "
                        f"{hf_cpu * flops / cpu_peak['fp32']:.1%}, and {tps_cpu * flops / floor_rate:.1%} vs "
                        f"{hf_cpu * flops / floor_rate:.1%} of the rate this shape's matmuls reach alone "
                        f"({floor_rate / cpu_peak['fp32']:.1%} of the peak)" if precision == "fp32" else "")
            rows.append((f"train tokens/s, {args.preset} ({cfg.d_model}d x{cfg.n_layers}), {precision}, "
                         f"lmforge {label} vs HF eager (lmforge = {of_peak:.1%}, HF = {hf_of_peak:.1%} of the "
                         f"{precision} matmul peak{cpu_note})", tps, hf_tps))
            print(f"{precision:5s} {label:8s} lmforge {tps:8.0f} tok/s   HF {hf_tps:8.0f} tok/s   "
                  f"ratio {tps / hf_tps:.2f}x   {of_peak:.1%} of the {precision} peak   HF at {hf_of_peak:.1%}"
                  f"{cpu_note}")
            del model, runner

    report([(fig, f"{ours:,.0f}", f"{peer:,.0f}", f"{ours / peer:.2f}") for fig, ours, peer in rows], machine_line(),
           script_command(), peak_line(peaks) + (f" ({bf16_skip_reason(peaks)})" if bf16_skip_reason(peaks) else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
