"""LoRA SFT of a real-shape model on CPU: `lmforge sft` (the real trainer) vs TRL `SFTTrainer` + PEFT, and lmforge
on a 4-bit / 8-bit base (QLoRA) vs its full-precision base.

Both sides train the same weights on the same tokens:
- the model is a preset (default `qwen2-0.5b`: its widths and 151,936-token vocabulary, 4 of its 24 blocks unless
  `--layers 0`) at random init,
  saved as an lmforge checkpoint and exported for transformers with `lmforge.model.hf.convert.to_hf`;
- the data are conversations cut from text the package ships (tests/textdata.py: Python's own English docs),
  rendered with the chat template and packed into `--seq-len` rows by lmforge's SFT batcher; the first rows are
  written out and TRL gets exactly those rows (`input_ids`, `labels` with -100 off the assistant turns) as a
  pre-tokenized dataset. lmforge also resets attention and positions at each packed conversation; TRL's
  rows are plain causal (its padding-free packing needs flash attention, absent on CPU);
- LoRA r=`--rank` (alpha 2r, no dropout) on every linear layer of every block, AdamW lr 1e-4, gradient clipping
  1.0, batch 1, `precision auto` (bf16 autocast where the CPU has fast bf16, else fp32; TRL gets the same),
  gradient checkpointing off on both sides (TRL's SFTConfig default is on; lmforge has none).

Each run is a fresh subprocess (`--child`); lmforge and TRL each run `--rounds` times in ABBA order, so load that
drifts during the benchmark falls on both sides alike, and a side's figure pools its runs' timed steps. lmforge runs
through `run_sft` (what `lmforge sft` runs), TRL through `SFTTrainer.train()`. Step time: the median over the steps
after `--warmup` (lmforge from its metrics.jsonl rows, TRL from a callback around each step), and the process CPU
time per step (lmforge between its loss calls, TRL around each step: the time a step took on the cores whatever else
runs, where the wall time of a loaded machine swings). Peak memory: the child's `ru_maxrss`, whole process, and that
minus the RSS after imports (the model, data and training). The setup (model, export, data) runs in a child too, so
this process stays small: Linux carries a parent's RSS into a child's ru_maxrss across fork + exec.

    OMP_NUM_THREADS=2 python benchmarks/lora_sft.py               # qwen2-0.5b widths and vocabulary, 4 blocks; int8
    OMP_NUM_THREADS=2 python benchmarks/lora_sft.py --layers 0 --quantize int4,int8   # all 24 blocks: slow on a CPU

The defaults take about 15 minutes on 2 cores shared with other jobs (setup 30-80 s, lmforge ~70 s and TRL
~150 s a run, int8 ~190 s). A QLoRA base multiplies the training rows by each layer's dequantized weight with the
dense kernel, so its steps take about as long as the full-precision base's (int4 once took over 10 minutes a
step, through torchao's scalar CPU int4 kernel).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import append_results, machine_line, scratch_dir, script_command, table

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
LR = 1e-4


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# children


def conversations(n: int, chars: int) -> list[dict]:
    """Chat records from shipped text: the user quotes a passage and asks for the next one; the assistant gives it."""
    from textdata import PYDOC_ENGLISH

    text = " ".join(PYDOC_ENGLISH.read_text(encoding="utf-8").split())
    out = []
    for i in range(n):
        at = i * 2 * chars
        passage, follow = text[at:at + chars], text[at + chars:at + 2 * chars]
        out.append({"messages": [{"role": "user", "content": f"Continue this passage:\n{passage}"},
                                 {"role": "assistant", "content": follow}]})
    return out


def prepare(args: argparse.Namespace, work: Path) -> dict:
    """The model (lmforge checkpoint + HF export), the conversations file and the packed rows TRL trains on."""
    import torch
    from tinymodels import save_checkpoint, task_tokenizer

    from lmforge.core.config import from_dict
    from lmforge.model import ModelConfig, Transformer
    from lmforge.model.hf.convert import to_hf
    from lmforge.model.presets import PRESETS
    from lmforge.model.size import num_params
    from lmforge.posttrain.models import pad_id_of
    from lmforge.posttrain.sft import SftBatches, SftConfig, load_sft_data

    tok = task_tokenizer()
    shape = {"preset": args.preset, "max_seq_len": max(args.seq_len, 128)}
    if args.layers:
        shape["n_layers"] = args.layers
    if args.vocab:
        shape["vocab_size"] = args.vocab
    elif "vocab_size" not in PRESETS[args.preset]:
        shape["vocab_size"] = tok.vocab_size
    torch.manual_seed(0)
    model = Transformer(from_dict(ModelConfig, shape)).eval()
    save_checkpoint(model, tok, work / "base")
    to_hf(work / "base", work / "hf")
    records = conversations(args.conversations, args.seq_len // 2)  # ~2-3 conversations a row
    (work / "convs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = from_dict(SftConfig, sft_settings(args, work, "none"))
    data = load_sft_data(cfg, tok, args.seq_len)
    batches = SftBatches(data.train, 1, args.seq_len, True, pad_id_of(tok), cfg.seed)
    rows = []
    for _ in range(args.warmup + args.steps):
        b = batches.next_batch()
        rows.append({"input_ids": b["input_ids"][0].tolist(), "labels": b["labels"][0].tolist()})
    (work / "rows.json").write_text(json.dumps(rows))
    c = model.cfg
    return {"model": f"{args.preset} shape ({c.d_model}d x{c.n_layers}, {c.n_heads}/{c.n_kv_heads} heads, d_ff "
                     f"{c.d_ff}, vocab {c.vocab_size:,}, {num_params(c) / 1e6:.0f}M params, random init)",
            "supervised": sum(sum(t != -100 for t in r["labels"]) for r in rows) / len(rows)}


def sft_settings(args: argparse.Namespace, work: Path, quantize: str) -> dict:
    lora = {"r": args.rank, "alpha": 2.0 * args.rank, "targets": ALL_LINEAR, "quantize": quantize}
    return {"checkpoint": str(work / "base"), "run_dir": str(work / f"run-{quantize}"),
            "data": [str(work / "convs.jsonl")], "tasks": 0, "eval_tasks": 0, "val_fraction": 0.0,
            "max_len": args.seq_len, "batch_size": 1, "packing": True, "peft": {"method": "lora", "lora": lora},
            "train": {"steps": args.warmup + args.steps, "lr": LR, "warmup_steps": 0,
                      "log_every": 1, "save_every": 0, "eval_every": 0, "device": "cpu", "precision": "auto",
                      "grad_clip": 1.0}}


def run_lmforge(args: argparse.Namespace, work: Path, quantize: str) -> dict:
    from lmforge.core.config import from_dict
    from lmforge.posttrain import sft
    from lmforge.posttrain.sft import SftConfig, run_sft

    shutil.rmtree(work / f"run-{quantize}", ignore_errors=True)  # an earlier round's run of this side
    starts = []  # process CPU time at each step's loss call: the CPU time a step took, whatever else runs
    loss = sft.sft_loss
    sft.sft_loss = lambda *a, **k: starts.append(time.process_time()) or loss(*a, **k)
    base = rss_mib()
    run_sft(from_dict(SftConfig, sft_settings(args, work, quantize)))  # the last step's CPU time goes unmeasured
    peak = peak_mib()
    rows = [json.loads(line) for line in (work / f"run-{quantize}" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    seen = [0] + [r["tokens_seen"] for r in rows]
    step_s = [(seen[i + 1] - seen[i]) / r["tokens_per_s"] for i, r in enumerate(rows)]
    return {"step_s": step_s, "cpu_s": [b - a for a, b in zip(starts, starts[1:])], "losses": [r["loss"] for r in rows],
            "peak_mib": peak, "after_imports_mib": base}


def run_trl(args: argparse.Namespace, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lmforge.core.runtime import resolve_precision

    base = rss_mib()
    bf16 = resolve_precision("auto", torch.device("cpu")) == "bf16"
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(work / "base" / "tokenizer.json"), pad_token="<|endoftext|>") \
        if not (work / "hf" / "tokenizer.json").exists() else None
    if tok is None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(work / "hf")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    data = Dataset.from_list(json.loads((work / "rows.json").read_text()))
    times: list[float] = []
    cpu: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.cpu)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    cfg = SFTConfig(output_dir=str(work / "trl"), max_steps=args.warmup + args.steps, per_device_train_batch_size=1,
                    learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                    bf16=bf16, fp16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
                    report_to="none", max_length=args.seq_len, packing=False, dataloader_num_workers=0,
                    use_cpu=True, seed=0, disable_tqdm=True)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=ALL_LINEAR,
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=[Clock()])
    trainer.train()
    return {"step_s": times, "cpu_s": cpu, "losses": losses, "peak_mib": peak_mib(), "after_imports_mib": base}


# ----------------------------------------------------------------------------------------------
# parent


def child(args: argparse.Namespace, work: Path, what: str) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--work", str(work), "--preset", args.preset,
           "--vocab", str(args.vocab), "--layers", str(args.layers), "--seq-len", str(args.seq_len),
           "--rank", str(args.rank),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--conversations", str(args.conversations)]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{what} failed (exit {done.returncode})")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {what}: {time.time() - t0:.0f} s wall, {json.dumps(out)[:300]}", file=sys.stderr)
    return out


def pooled(runs: list[dict], warmup: int) -> dict:
    """The timed steps of several runs of one side together (each run's warm-up dropped), its worst peak RSS."""
    worst = max(runs, key=lambda r: r["peak_mib"])
    return {"step_s": [t for r in runs for t in r["step_s"][warmup:]],
            "cpu_s": [t for r in runs for t in r["cpu_s"][warmup:]], "losses": runs[0]["losses"],
            "peak_mib": worst["peak_mib"], "after_imports_mib": worst["after_imports_mib"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--vocab", type=int, default=0, help="vocab_size override (0: the preset's, else the tokenizer's)")
    ap.add_argument("--layers", type=int, default=4, help="n_layers override (0: the preset's): the same widths, "
                                                           "fewer blocks, for a loaded CPU")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (median)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating lmforge/TRL (ABBA)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--quantize", default="int8", help="QLoRA bases to measure besides full precision ('' none)")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL + PEFT run")
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--load", default="", help="what else loads the machine, for the machine column")
    ap.add_argument("--append", action="store_true", help=f"append the rows to {RESULTS.name}")
    ap.add_argument("--child", choices=["prepare", "lmforge-none", "lmforge-int8", "lmforge-int4", "trl"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        work = Path(args.work)
        if args.child == "prepare":
            out = prepare(args, work)
        elif args.child == "trl":
            out = run_trl(args, work)
        else:
            out = run_lmforge(args, work, args.child.removeprefix("lmforge-"))
        print(json.dumps(out))
        return 0

    load = args.load or f"load average {Path('/proc/loadavg').read_text().split()[0]}"
    with scratch_dir("lmforge-lora-sft-") as work:
        info = child(args, work, "prepare")
        sides = ["lmforge-none"] + ([] if args.no_trl else ["trl"])
        rounds = []  # ABBA order: load that drifts during the run falls on both sides alike
        for r in range(args.rounds):
            rounds.append({what.removeprefix("lmforge-"): child(args, work, what)
                           for what in (sides if r % 2 == 0 else sides[::-1])})
        runs = {k: pooled([rnd[k] for rnd in rounds], args.warmup) for k in rounds[0]}
        for q in [q for q in args.quantize.split(",") if q]:
            runs[q] = pooled([child(args, work, f"lmforge-{q}")], args.warmup)
    step = {k: statistics.median(r["step_s"]) for k, r in runs.items()}
    cpu = {k: statistics.median(r["cpu_s"]) for k, r in runs.items()}
    what = (f"{info['model']}, LoRA r={args.rank} all linear, batch 1 x {args.seq_len} packed "
            f"(~{info['supervised']:.0f} supervised tokens/row), precision auto, median of {args.steps} steps "
            f"after {args.warmup} warm-up x {args.rounds} alternating runs")
    rows = []
    if "trl" in runs:
        ours, trl = runs["none"], runs["trl"]
        grown = {k: r["peak_mib"] - r["after_imports_mib"] for k, r in (("ours", ours), ("trl", trl))}
        rows += [(f"LoRA SFT step time s, lmforge sft vs TRL SFTTrainer + PEFT (peer), {what}",
                  f"{step['none']:.2f}", f"{step['trl']:.2f}", f"{step['trl'] / step['none']:.2f}x"),
                 (f"LoRA SFT CPU seconds per step (all threads; less distorted by other jobs than wall time), "
                  f"lmforge vs TRL + PEFT, {what}",
                  f"{cpu['none']:.2f}", f"{cpu['trl']:.2f}", f"{cpu['trl'] / cpu['none']:.2f}x"),
                 (f"LoRA SFT peak RSS MiB (whole process), lmforge vs TRL + PEFT, {what}",
                  f"{ours['peak_mib']:,.0f}", f"{trl['peak_mib']:,.0f}", f"{trl['peak_mib'] / ours['peak_mib']:.2f}x"),
                 (f"LoRA SFT peak RSS MiB over RSS after imports, lmforge vs TRL + PEFT, {what}",
                  f"{grown['ours']:,.0f}", f"{grown['trl']:,.0f}", f"{grown['trl'] / grown['ours']:.2f}x")]
    for q in ("int4", "int8"):
        if q in runs:
            full, quant = runs["none"], runs[q]
            rows += [(f"QLoRA SFT peak RSS MiB, lmforge {q} base vs full-precision base (peer), {what}",
                      f"{quant['peak_mib']:,.0f}", f"{full['peak_mib']:,.0f}",
                      f"{full['peak_mib'] / quant['peak_mib']:.2f}x"),
                     (f"QLoRA SFT step time s, lmforge {q} base vs full-precision base (peer), {what}",
                      f"{step[q]:.2f}", f"{step['none']:.2f}", f"{step['none'] / step[q]:.2f}x")]
    machine, command = machine_line(extra=load), script_command()
    print(table(rows, machine, command))
    print("\nratio = peer / lmforge: above 1 means lmforge takes less time or memory.")
    print("first losses (same weights and tokens; lmforge resets attention at packed boundaries): "
          + "; ".join(f"{k} {[round(x, 3) for x in r['losses'][:3]]}" for k, r in runs.items()))
    if args.append:
        append_results(RESULTS, rows, machine, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
