"""Generation benchmark: batch-1 greedy decode tokens/s against HF `generate` and against the memory roofline.

Batch-1 decoding is memory-bound: each token reads every weight once, so tokens/s <= bandwidth / bytes of weights
read per token (`lmforge.model.quant.bytes_per_token`). The bandwidth is measured here (`memory_bandwidth`: a
STREAM-style triad in torch), and every row states its tokens/s as a fraction of that roofline.

Two shapes, random init, real shapes: a ~34M-parameter LLaMA-shaped model and Qwen2-0.5B (`qwen2-0.5b` preset,
context cut to 512). Each is exported to its HF twin (`hf_config_from_model` / `state_dict_to_hf`), fp32,
greedy, a 32-token prompt, no stop token. HF uses its default (dynamic) KV cache and SDPA attention. Rows:

- eager: the KV-cache engine (`generate(model, ids, params)`);
- compiled: `Strategy(compile=True)`, the static-shape step (whole preallocated cache, length mask) under
  torch.compile (inductor's C++ kernels on CPU; CUDA graphs on CUDA), its compilation in the warm-up;
- int8: the compiled step (eager with `--no-compile`) on int8 weights through lmforge's own CPU kernel
  (`quantize_weights(model, 8, kernel="lmforge")`, `lmforge.model.int8_gemv`; what `--quantize int8` runs on CPU);
  on CUDA, torchao's int8;
- int8 / int4 torchao (`--torchao`, CPU): the same step on torchao's weight-only tensors (slower than fp32 on AVX2).
- speculative (34M only, `--spec`): the model as its own draft (acceptance 100 %, an upper bound).

Timings are the median of interleaved repeats (A B A B ...), so other processes' load on a shared machine falls on
all alike; tokens/s counts new tokens over the whole call (prefill included). The quality cost of int8/int4 is
benchmarks/quant_quality.py's.

    .venv/bin/python benchmarks/generation.py [--repeats 5] [--new-tokens 128] [--big-new-tokens 16] \
        [--shapes 34M 0.5B] [--threads N] [--no-quant] [--torchao] [--no-compile] [--spec] [--append]
"""

from __future__ import annotations

import argparse
import copy
import gc
import subprocess
import sys
from pathlib import Path

import torch
from common import append_results, interleaved, machine_line, memory_bandwidth, script_command, table

from lmforge.core.config import from_dict
from lmforge.core.runtime import resolve_device
from lmforge.generate.engine import Strategy, generate
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.speculative import speculative_generate
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf.registry import hf_config_from_model, state_dict_to_hf
from lmforge.model.io import model_state_dict
from lmforge.model.quant import bytes_per_token, quantize_weights

SHAPES = {
    "34M": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1408, vocab_size=8192, max_seq_len=512),
    "0.5B": dict(preset="qwen2-0.5b", max_seq_len=512),
}
FAMILY = {"34M": "llama", "0.5B": "qwen2"}
PROMPT_LEN = 32
RESULTS = Path(__file__).with_name("RESULTS.md")


def build(shape: str, device: torch.device) -> tuple[Transformer, torch.nn.Module]:
    import transformers

    torch.manual_seed(0)
    ours = Transformer(from_dict(ModelConfig, SHAPES[shape])).eval()
    hf_cfg = hf_config_from_model(ours.cfg, family=FAMILY[shape])
    config = transformers.AutoConfig.for_model(**hf_cfg)
    config._attn_implementation = "sdpa"
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.load_state_dict(state_dict_to_hf(model_state_dict(ours), ours.cfg, FAMILY[shape]), strict=False)
    if ours.cfg.tie_embeddings:
        hf.tie_weights()
    return ours.to(device), hf.to(device)


def quantized(model: Transformer, bits: int, kernel: str = "torchao") -> Transformer:
    q = copy.deepcopy(model)
    quantize_weights(q, bits, kernel=kernel)
    return q


def bench_shape(shape: str, n: int, repeats: int, device: torch.device, bandwidth: float, quant: bool,
                spec: bool, compiled: bool = True, torchao: bool = False) -> list[tuple[str, str, str, str]]:
    ours, hf = build(shape, device)
    vocab = ours.cfg.vocab_size
    prompt = torch.randint(0, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(greedy=True, max_new_tokens=n)
    x = torch.tensor([prompt], device=device)
    models = {"eager": ours, "compiled": ours} if compiled else {"eager": ours}
    if quant and device.type == "cpu":
        models["int8"] = quantized(ours, 8, "lmforge")
        if compiled:
            models["int8-eager"] = models["int8"]
        if torchao:
            models.update({"int8-torchao": quantized(ours, 8), "int4": quantized(ours, 4)})
    elif quant:
        models["int8"] = quantized(ours, 8)

    @torch.no_grad()
    def run_hf() -> list[int]:
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        return out[0, PROMPT_LEN:].tolist()

    def runner(model: Transformer, compile: bool):
        return lambda: generate(model, prompt, Strategy(sampling=params, compile=compile))

    cases = {"hf": run_hf, **{name: runner(m, compiled and "eager" not in name) for name, m in models.items()}}
    if spec:
        cases["spec"] = lambda: speculative_generate(ours, ours, prompt, params, num_draft=4)[0]
    times, outputs = interleaved(cases, repeats, warmup=1, device=device)  # warm-up: compilation, allocator
    tps = {k: n / t for k, t in times.items()}
    params_m = sum(p.numel() for p in ours.parameters()) / 1e6
    same = outputs["eager"] == outputs["hf"] == outputs.get("compiled", outputs["eager"])
    print(f"{shape}: {params_m:.0f}M params, prompt {PROMPT_LEN}, {n} new tokens, greedy, batch 1; eager == HF == "
          f"compiled tokens: {same}; int8/int4 greedy agreement with fp32: "
          + ", ".join(f"{k} {agreement(outputs['eager'], outputs[k]):.0%}" for k in ("int8", "int8-torchao", "int4")
                      if k in outputs),
          file=sys.stderr)
    peer = f"{tps['hf']:.1f} (HF generate)"
    how = f"compiled ({'CUDA graphs' if device.type == 'cuda' else 'inductor'})" if compiled else "eager"
    labels = {"eager": "eager KV-cache engine", "compiled": f"`compile=True` static-shape step, {how}",
              "int8": f"int8 weights ({'lmforge kernel' if device.type == 'cpu' else 'torchao'}), {how}",
              "int8-eager": "int8 weights (lmforge kernel), eager", "int8-torchao": f"int8 weights (torchao), {how}",
              "int4": f"int4 weights (torchao), {how}"}
    rows = []
    for name, label in labels.items():
        if name not in tps:
            continue
        weight_bytes = bytes_per_token(models[name])
        roofline = bandwidth / weight_bytes
        rows.append((f"batch-1 greedy decode tokens/s, {params_m:.0f}M params fp32 {label}; {n} new; "
                     f"{weight_bytes / 1e6:.0f} MB weights/token, roofline {roofline:.1f} tok/s",
                     f"{tps[name]:.1f} ({tps[name] / roofline:.0%} of roofline)", peer,
                     f"{tps[name] / tps['hf']:.2f}x"))
    if spec:
        rows.append((f"speculative decode tokens/s ({params_m:.0f}M, self-draft, 4 draft tokens)",
                     f"{tps['spec']:.1f}", peer, f"{tps['spec'] / tps['hf']:.2f}x"))
    return rows


def agreement(reference: list[int], other: list[int]) -> float:
    """Greedy agreement: the fraction of positions where `other` matches `reference`, up to the first mismatch."""
    same = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        same += 1
    return same / max(1, len(reference))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens for the 34M shape")
    parser.add_argument("--big-new-tokens", type=int, default=16, help="new tokens for the 0.5B shape")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--no-quant", action="store_true", help="skip the int8/int4 rows")
    parser.add_argument("--torchao", action="store_true", help="add torchao's int8 and int4 rows (CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled row; int8/int4 decode eagerly")
    parser.add_argument("--spec", action="store_true", help="add the speculative-decoding row (34M)")
    parser.add_argument("--append", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    bandwidth = memory_bandwidth()
    print(f"memory bandwidth (triad): {bandwidth / 1e9:.1f} GB/s", file=sys.stderr)
    rows = []
    for shape in args.shapes:
        n = args.new_tokens if shape == "34M" else args.big_new_tokens
        rows += bench_shape(shape, n, args.repeats, device, bandwidth, not args.no_quant,
                            args.spec and shape == "34M", not args.no_compile, args.torchao)
        gc.collect()  # the previous shape's models (the 0.5B one and its HF twin hold ~4 GB)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1]
    machine = machine_line(device, extra=f"triad {bandwidth / 1e9:.1f} GB/s, shared machine, load average{load}")
    command = script_command()
    print(table(rows, machine, command))
    if args.append:
        append_results(RESULTS, rows, machine, command)


if __name__ == "__main__":
    main()
