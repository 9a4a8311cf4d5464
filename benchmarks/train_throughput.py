"""Training throughput: lmforge vs HF transformers LlamaForCausalLM, same config, data, optimizer, threads.

Measures tokens/s of full training steps (forward, loss, backward, AdamW step) for fp32 and bf16
autocast: lmforge through the trainer's own loss (`lm_loss`: LM head fused with the cross-entropy) and
compile path (`compile_model`), HF through its logits, both with `build_optimizer`'s AdamW. Reports
achieved FLOP/s as a fraction of this machine's bf16 matmul peak (and the peer's fraction of the fp32
or bf16 peak, which bounds any speed-up), measured in the same run, and
appends its table to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/train_throughput.py --preset tiny --steps 8
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from lmforge.core.config import from_dict
from lmforge.core.runtime import autocast, compile_model
from lmforge.model import ModelConfig, Transformer
from lmforge.model.size import flops_per_token, num_params
from lmforge.train.config import TrainConfig
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.optim import build_optimizer
from lmforge.train.pretrain import lm_loss

SHAPES = {
    # the DESIGN.md reference shapes
    "tiny": dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=688, vocab_size=32000, seq_len=256, batch=16),
    "small": dict(d_model=768, n_layers=4, n_heads=12, n_kv_heads=12, d_ff=2048, vocab_size=32000, seq_len=512,
                  batch=8),
}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                         initializer_range=cfg.init_std)
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def step_fn(model: torch.nn.Module, is_hf: bool, precision: str):
    opt = build_optimizer(model, TrainConfig(lr=1e-4))
    device = torch.device("cpu")

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> float:
        with autocast(device, precision):
            if is_hf:
                loss = causal_lm_loss(model(inputs).logits, targets)
            else:
                loss, _ = lm_loss(model, (inputs, targets))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def measure(step, batch: int, seq_len: int, vocab: int, steps: int, warmup: int) -> float:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    inputs, targets = data[:, :-1], data[:, 1:]
    for _ in range(warmup):
        step(inputs, targets)
    start = time.perf_counter()
    for _ in range(steps):
        step(inputs, targets)
    return batch * seq_len * steps / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(SHAPES), default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = ap.parse_args()

    shape = dict(SHAPES[args.preset])
    batch, seq_len = shape.pop("batch"), shape.pop("seq_len")
    cfg = from_dict(ModelConfig, {**shape, "max_seq_len": seq_len})
    flops = flops_per_token(cfg, seq_len)
    threads = torch.get_num_threads()
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    peak_bf16 = peaks["bf16"]
    print(f"threads={threads}  matmul peak fp32 {peaks['fp32'] / 1e9:.0f} / bf16 {peak_bf16 / 1e9:.0f} GFLOP/s  "
          f"params {num_params(cfg) / 1e6:.1f}M  FLOPs/token {flops / 1e6:.1f}M")

    rows = []
    for precision in args.precisions.split(","):
        torch.manual_seed(0)
        hf = hf_model(cfg)
        hf_tps = measure(step_fn(hf, True, precision), batch, seq_len, cfg.vocab_size, args.steps, args.warmup)
        del hf
        variants = [("eager", False)] + ([] if args.no_compile else [("compiled", True)])
        for label, compiled in variants:
            torch.manual_seed(0)
            model = Transformer(cfg)
            runner = compile_model(model) if compiled else model
            tps = measure(step_fn(runner, False, precision), batch, seq_len, cfg.vocab_size, args.steps,
                          args.warmup + (2 if compiled else 0))
            mfu = tps * flops / peak_bf16
            # how close the peer already is to this precision's matmul ceiling bounds any ratio
            hf_of_peak = hf_tps * flops / peaks.get(precision, peak_bf16)
            rows.append((f"train tokens/s, {args.preset} ({cfg.d_model}d x{cfg.n_layers}), {precision}, "
                         f"lmforge {label} vs HF eager (lmforge = {mfu:.1%} of bf16 matmul peak; "
                         f"HF = {hf_of_peak:.0%} of the {precision} matmul peak)", tps, hf_tps))
            print(f"{precision:5s} {label:8s} lmforge {tps:8.0f} tok/s   HF {hf_tps:8.0f} tok/s   "
                  f"ratio {tps / hf_tps:.2f}x   {mfu:.1%} of bf16 peak   HF at {hf_of_peak:.0%} of {precision} peak")
            del model, runner

    machine = (f"{platform.machine()} {threads} threads, torch {torch.__version__}, "
               f"matmul peak fp32 {peaks['fp32'] / 1e9:.0f} / bf16 {peak_bf16 / 1e9:.0f} GFLOP/s")
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [f"| {fig} | {ours:,.0f} | {peer:,.0f} | {ours / peer:.2f} | {machine} | `{command}` |"
             for fig, ours, peer in rows]
    _append_results(Path(args.results), lines)
    return 0


def _append_results(path: Path, lines: list[str]) -> None:
    header = "| figure | lmforge | peer | ratio | machine | command |\n|---|---|---|---|---|---|\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if header not in text:
        text += "\n" + header
    path.write_text(text.rstrip("\n") + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
