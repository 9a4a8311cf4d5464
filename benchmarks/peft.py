"""PEFT benchmark: LoRA vs full fine-tuning (lmforge, same model), and lmforge LoRA vs HF PEFT LoRA.

Every case is one training step repeated (forward, loss, backward, clip, AdamW over the trainable tensors)
on the same weights: lmforge's model and the HF LlamaForCausalLM hold identical tensors (converted with
`lmforge.model.hf.registry.state_dict_to_hf`), and both LoRAs have the same rank, alpha and targets. lmforge uses
its trainer's loss (`lm_loss`, head fused with the cross-entropy), HF its logits + cross-entropy.

Step time: the median over steps of all cases interleaved in one process (A B C A B C ...), so the load
other processes put on this shared machine falls on every case alike. Peak memory: each case runs two
steps in a fresh subprocess, which reports `resource.getrusage(RUSAGE_SELF).ru_maxrss` (its peak resident
set) minus its RSS just before the first step (model and optimizer built): the extra memory training
needs (activations, gradients, optimizer state). Prints a markdown table.

    .venv/bin/python benchmarks/peft.py
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from collections.abc import Callable

import torch
from common import (
    bf16_skip_reason,
    interleaved,
    machine_line,
    matmul_peaks,
    peak_line,
    report,
    script_command,
    training_step,
)

from lmforge.core.config import from_dict
from lmforge.core.runtime import compile_model
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf.registry import state_dict_to_hf
from lmforge.model.io import model_state_dict
from lmforge.model.size import flops_per_token, num_params
from lmforge.peft import LoraConfig, apply_lora

# This file is named peft.py: `common` dropped its folder from the import path, so `import peft` finds HF PEFT.

SHAPE = dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, d_ff=1408, vocab_size=16000, max_seq_len=256)
TARGETS = {"qv": ["q_proj", "v_proj"], "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]}


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def build(kind: str, targets: str, rank: int) -> torch.nn.Module:
    """kind: full | lora | hf-lora; the same seeded weights every time."""
    torch.manual_seed(0)
    model = Transformer(from_dict(ModelConfig, SHAPE))
    if kind == "lora":
        return apply_lora(model, LoraConfig(r=rank, alpha=2.0 * rank, targets=TARGETS[targets]))
    if kind == "full":
        return model
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                         max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                         tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(state_dict_to_hf(model_state_dict(model), c), strict=True)
    return peft.get_peft_model(hf, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS[targets],
                                                   lora_dropout=0.0, task_type="CAUSAL_LM"))


def make_step(kind: str, targets: str, rank: int, precision: str, batch: int, seq_len: int
              ) -> tuple[Callable[[], None], int]:
    """One training step of a freshly built case (forward, loss, backward, clip, AdamW), and its trainable count.
    kind `lora-compiled` runs the LoRA model through `compile_model` (the trainer's train.compile=true)."""
    model = build(kind.removesuffix("-compiled"), targets, rank).train()
    runner = compile_model(model) if kind.endswith("-compiled") else model
    data = torch.randint(0, SHAPE["vocab_size"], (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    step = training_step(model, data[:, :-1], data[:, 1:], precision, hf=kind == "hf-lora", runner=runner)
    return step, sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_memory(kind: str, targets: str, rank: int, precision: str, batch: int, seq_len: int) -> float:
    """MiB: this process's peak RSS after two steps minus its RSS before the first (run in a fresh process)."""
    step, _ = make_step(kind, targets, rank, precision, batch, seq_len)
    base = rss_kib()
    step()
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def spawn_memory(args: argparse.Namespace, case: tuple[str, str, str], runs: int = 2) -> float:
    """The smallest of `runs` fresh-process measurements (allocator noise only ever adds)."""
    kind, targets, precision = case
    cmd = [sys.executable, __file__, "--case", kind, "--targets", targets, "--precision", precision,
           "--rank", str(args.rank), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    return min(float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
               for _ in range(runs))


def step_times(args: argparse.Namespace, cases: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], float]:
    """Median step time of each case, the cases' steps interleaved (A B C A B C ...) in one process, so load
    from other processes on this shared machine falls on all of them alike."""
    steps = {case: make_step(case[0], case[1], args.rank, case[2], args.batch, args.seq_len)[0] for case in cases}
    return interleaved(steps, args.steps, args.warmup)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["full", "lora", "hf-lora"], help=argparse.SUPPRESS)
    ap.add_argument("--targets", choices=list(TARGETS), default="qv", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per case (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per case (the compiled cases compile here)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd lmforge LoRA cases")
    args = ap.parse_args()
    if args.case:
        print(peak_memory(args.case, args.targets, args.rank, args.precision, args.batch, args.seq_len))
        return 0

    c = from_dict(ModelConfig, SHAPE)
    model_text = (f"{c.d_model}d x{c.n_layers}, vocab {c.vocab_size}, {num_params(c) / 1e6:.1f}M params, "
                  f"batch {args.batch}x{args.seq_len}, r={args.rank}")
    peaks = matmul_peaks()
    machine, command = machine_line(extra=peak_line(peaks)), script_command()
    precisions = args.precisions.split(",")
    if "bf16" in precisions and bf16_skip_reason(peaks):
        print(bf16_skip_reason(peaks), file=sys.stderr)
        precisions.remove("bf16")
    all_cases = {precision: [(kind, targets, precision) for kind, targets in (
        ("full", "qv"), ("lora", "qv"), ("hf-lora", "qv"), ("lora", "all"), ("hf-lora", "all"))]
        + ([] if args.no_compile else [("lora-compiled", "qv", precision), ("lora-compiled", "all", precision)])
        for precision in precisions}
    # Memory first, while this process is still small: Linux carries a parent's peak RSS into a child's
    # ru_maxrss across fork + exec, so children spawned later would report this process's peak instead.
    memory = {case: spawn_memory(args, case) for precision in precisions for case in all_cases[precision][:3]}
    rows, of_peak = [], []
    for precision in precisions:
        cases = all_cases[precision]
        times = step_times(args, cases)
        for case in cases:
            print(f"  {' '.join(case):18s} {times[case] * 1000:8.0f} ms/step"
                  + (f", +{memory[case]:.0f} MiB peak" if case in memory else ""), file=sys.stderr)
        full = ("full", "qv", precision)
        full_of_peak = flops_per_token(c, args.seq_len) * args.batch * args.seq_len / times[full] / peaks[precision]
        of_peak.append((f"full fine-tuning step FLOP/s, % of the {precision} matmul peak, {model_text}",
                        f"{full_of_peak:.1%}", "-", "-"))
        for targets in ("qv", "all"):
            ours, theirs = ("lora", targets, precision), ("hf-lora", targets, precision)
            what = f"{model_text}, LoRA on {'/'.join(TARGETS[targets]) if targets == 'qv' else 'all linear'}"
            if targets == "qv":
                rows.append((f"step time ms, LoRA (lmforge) vs full fine-tuning (peer column), {what}, {precision}",
                             times[ours] * 1000, times[full] * 1000, times[full] / times[ours]))
                rows.append((f"peak training memory MiB (ru_maxrss over pre-step RSS), LoRA vs full fine-tuning "
                             f"(peer column), {what}, {precision}", memory[ours], memory[full],
                             memory[full] / max(memory[ours], 1e-9)))
                rows.append((f"peak training memory MiB, lmforge LoRA vs HF PEFT LoRA, {what}, {precision}",
                             memory[ours], memory[theirs], memory[theirs] / max(memory[ours], 1e-9)))
            rows.append((f"step time ms, lmforge LoRA vs HF PEFT LoRA (both eager), {what}, {precision}",
                         times[ours] * 1000, times[theirs] * 1000, times[theirs] / times[ours]))
            compiled = ("lora-compiled", targets, precision)
            if compiled in times:
                rows.append((f"step time ms, lmforge LoRA compiled (train.compile=true) vs HF PEFT LoRA eager, {what}, "
                             f"{precision}", times[compiled] * 1000, times[theirs] * 1000,
                             times[theirs] / times[compiled]))
    report([(fig, f"{ours:,.0f}", f"{peer:,.0f}", f"{ratio:.2f}x") for fig, ours, peer, ratio in rows] + of_peak,
           machine, command, f"{peak_line(peaks)}; the full fine-tuning step's fraction of it is a row")
    print("\nratio = peer / lmforge: above 1 means lmforge (or LoRA) takes less time or memory.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
