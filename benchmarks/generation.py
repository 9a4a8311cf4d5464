"""Generation benchmark: batch-1 greedy decode tokens/s, lmforge's KV-cache engine vs HF `generate`.

Both run the same weights (a ~30M-parameter LLaMA-shaped lmforge model exported to a
LlamaForCausalLM with `lmforge.model.hf.registry.hf_config_from_model` / `state_dict_to_hf`), fp32, greedy,
128 new tokens after a 32-token prompt, no stop token. HF uses its default (dynamic) KV cache and SDPA
attention. Timings are the median of interleaved repeats (A B A B ...), so the load other processes
put on this shared machine falls on both alike; tokens/s counts new tokens over the whole call
(prefill included). Also: speculative decoding with the model as its own draft (acceptance 100 %,
an upper bound on what a draft buys) is reported as a row, with the acceptance rate; and the opt-in static-shape
step (`Strategy(compile=True)`: whole-cache length mask, torch.compile "reduce-overhead", i.e. CUDA graphs on
CUDA; eager on CPU), its first (compiling) call in the warm-up. Prints a markdown table.

    .venv/bin/python benchmarks/generation.py [--repeats 5] [--new-tokens 128] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import interleaved, machine_line, table

from lmforge.core.config import from_dict
from lmforge.core.runtime import resolve_device
from lmforge.generate.engine import Strategy, generate
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.speculative import speculative_generate
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf.registry import hf_config_from_model, state_dict_to_hf
from lmforge.model.io import model_state_dict

SHAPE = dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1408, vocab_size=8192, max_seq_len=512)
PROMPT_LEN = 32


def build(device: torch.device) -> tuple[Transformer, torch.nn.Module]:
    import transformers

    torch.manual_seed(0)
    ours = Transformer(from_dict(ModelConfig, SHAPE)).eval()
    config = transformers.LlamaConfig(**hf_config_from_model(ours.cfg))
    config._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(state_dict_to_hf(model_state_dict(ours), ours.cfg), strict=False)
    if ours.cfg.tie_embeddings:
        hf.tie_weights()
    return ours.to(device), hf.to(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    args = parser.parse_args()
    n = args.new_tokens
    device = resolve_device(args.device)
    ours, hf = build(device)
    prompt = torch.randint(0, SHAPE["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(greedy=True, max_new_tokens=n)
    x = torch.tensor([prompt], device=device)

    @torch.no_grad()
    def run_hf() -> list[int]:
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        return out[0, PROMPT_LEN:].tolist()

    def run_ours() -> list[int]:
        return generate(ours, prompt, params)

    def run_compiled() -> list[int]:
        return generate(ours, prompt, Strategy(sampling=params, compile=True))

    def run_spec() -> list[int]:
        return speculative_generate(ours, ours, prompt, params, num_draft=4)[0]

    cases = {"lmforge": run_ours, "hf": run_hf, "spec": run_spec, "compiled": run_compiled}
    # one warm-up round (allocator, first-call overheads, the compiled step's compilation)
    times, outputs = interleaved(cases, args.repeats, warmup=1, device=device)
    same = outputs["lmforge"] == outputs["hf"] == outputs["spec"] == outputs["compiled"]
    _, stats = speculative_generate(ours, ours, prompt, params, num_draft=4)
    tps = {k: n / t for k, t in times.items()}
    params_m = sum(p.numel() for p in ours.parameters()) / 1e6
    command = f"python benchmarks/generation.py --repeats {args.repeats} --new-tokens {n} --device {args.device}"
    print(f"\n{params_m:.1f}M params, prompt {PROMPT_LEN}, {n} new tokens, greedy fp32, batch 1; "
          f"same tokens in all four: {same}", file=sys.stderr)
    peer = f"{tps['hf']:.1f} (HF generate)"
    rows = [
        (f"batch-1 greedy decode tokens/s ({params_m:.0f}M params, {n} new)", f"{tps['lmforge']:.1f}", peer,
         f"{tps['lmforge'] / tps['hf']:.2f}x"),
        (f"speculative decode tokens/s (self-draft, 4 draft tokens, acceptance {stats.acceptance_rate:.0%})",
         f"{tps['spec']:.1f}", peer, f"{tps['spec'] / tps['hf']:.2f}x"),
        (f"batch-1 greedy decode tokens/s, `compile=True` (static-shape step, "
         f"{'CUDA graphs' if device.type == 'cuda' else 'eager on CPU'})", f"{tps['compiled']:.1f}", peer,
         f"{tps['compiled'] / tps['hf']:.2f}x"),
    ]
    print(table(rows, machine_line(device), command))


if __name__ == "__main__":
    main()
