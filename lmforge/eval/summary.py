"""The quickstart's summary of a run: the text printed at the end and summary.md.

Both are functions of the summary dict alone (what summary.json holds), so they can be tested and reworded
without running a stage.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from lmforge.tasks.suite import make_examples

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "f16c", "asimd", "sve")


def machine_info() -> dict[str, Any]:
    """The machine a run ran on, for the report card: CPU, the SIMD flags matmuls care about, threads, GPU."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:  # not Linux: no flags to show
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cpu_flags": [f for f in CPU_FLAGS if f in flags],
            "threads": torch.get_num_threads(), "gpu": gpu or "none", "torch": torch.__version__}


def _metric(stages: dict[str, Any], label: str, task: str, metric: str) -> float | None:
    return (stages.get("eval") or {}).get("models", {}).get(label, {}).get(task, {}).get(metric)


def _task_lines(st: dict[str, Any]) -> list[str]:
    """One line per task metric: each evaluated model's score, in stage order (base -> sft -> dpo)."""
    labels = list((st.get("eval") or {}).get("models", {}))
    if not labels:
        return []
    lines = []
    for task, metric in (("synthetic", "exact_match"), ("cloze", "acc_norm")):
        values = [_metric(st, label, task, metric) for label in labels]
        shown = " -> ".join(f"{label} {v:.3f}" for label, v in zip(labels, values) if v is not None)
        if shown:
            lines.append(f"  {task + ' ' + metric + ':':<24} {shown}")
    return lines


def try_prompts(kinds: list[str], n: int = 2) -> list[str]:
    """Prompts of the task kinds the chat model was trained on, drawn from the training half of the suite:
    prompts the trained model can answer (a kind it never saw, such as `add`, gets garbage)."""
    return [e.prompt for e in make_examples(min(n, len(kinds)), seed=0, kinds=kinds[:n])] if kinds else []


def summary_text(summary: dict[str, Any], report: Path) -> str:
    """What each stage did, the held-out scores, samples, and the commands to try the models next."""
    st = summary["stages"]
    pt = st["pretrain"]
    b, a = pt["val_before"], pt["val_after"]
    run = Path(summary["run_dir"])
    lines = [
        "",
        "=" * 72,
        f"lmforge quickstart finished in {summary['seconds']} s  ->  {run}",
        f"  corpus:    {st['corpus'].get('docs')} documents, "
        f"{st['corpus'].get('bytes', 0) / 1e6:.1f} MB of stdlib code + docs",
    ]
    if st.get("clean"):
        lines.append(f"  clean:     kept {st['clean']['docs_kept']} of {st['clean']['docs_in']} documents "
                     f"({', '.join(st['clean']['steps'])}); report {run / 'clean' / 'report.md'}")
    lines += [
        f"  tokenizer: byte-level BPE, {st['tokenizer']['vocab_size']} tokens",
        f"  shards:    {st['shards']['train_tokens']:,} train / {st['shards']['val_tokens']:,} val tokens",
        f"  pretrain:  {pt.get('steps')} steps, {pt.get('tokens_per_s', 0):,.0f} tokens/s",
        f"  val loss:  {b['loss']:.3f} -> {a['loss']:.3f} nats/token;  bits/byte {b['bits_per_byte']:.3f} -> "
        f"{a['bits_per_byte']:.3f}" if b and a else f"  train loss: {pt.get('final_loss', float('nan')):.3f} "
                                                    "(an encoder-decoder has no validation perplexity)",
    ]
    if st.get("sft"):
        lines.append(f"  sft:       {st['sft']['steps']} steps on {st['sft']['train_conversations']} synthetic "
                     f"task conversations, final loss {st['sft']['final_loss']:.3f}")
    if st.get("dpo"):
        d = st["dpo"]
        lines.append(f"  dpo+lora:  held-out log-prob margin {d['heldout_logp_margin_before']:.3f} -> "
                     f"{d['heldout_logp_margin']:.3f}, preference accuracy "
                     f"{d['heldout_preference_accuracy_before']:.3f} -> {d['heldout_preference_accuracy']:.3f}")
    lines += _task_lines(st)
    lines += ["", "samples after pretraining:", *[f"  | {s!r}" for s in pt["samples_after"]]]
    chat = summary["models"].get("dpo") or summary["models"].get("sft") or summary["models"]["base"]
    adapter = f" --adapter {chat['adapter']}" if chat.get("adapter") else ""
    serve = chat["checkpoint"]
    lines += ["", "next:"]
    if chat.get("adapter"):
        serve = str(run / "chat-model")
        lines.append(f"  lmforge merge-adapter --checkpoint {chat['checkpoint']} --adapter {chat['adapter']} "
                     f"--output {serve}")
    if pt.get("val_after"):  # decoder-only models chat; an encoder-decoder fills spans
        prompts = try_prompts(summary.get("task_kinds") or []) if "sft" in summary["models"] else []
        hint = f"      (try: {', or '.join(prompts)})" if prompts else ""
        lines.append(f"  lmforge chat --checkpoint {chat['checkpoint']}{adapter}{hint}")
        if not pt.get("prefix_lm"):  # serve decodes causal decoders only
            lines.append(f"  lmforge serve --checkpoint {serve}      "
                         "(then open http://127.0.0.1:8000 for the web chat)")
        lines += [
            f"  lmforge generate --checkpoint {pt['model_dir']} --prompt 'def main(' --sampling.max-new-tokens 80",
            f"  lmforge eval --checkpoint {pt['model_dir']} --data {run / 'shards'}",
        ]
    lines.append(f"  report: {report}   (lmforge report {run}; lmforge compare RUN_A RUN_B)")
    return "\n".join(lines)


def _val_markdown(pt: dict[str, Any]) -> str:
    b, a = pt["val_before"], pt["val_after"]
    if not (b and a):
        return f"Final training loss {pt['final_loss']:.3f} (no validation perplexity for this architecture).\n\n"
    return (f"Validation loss {b['loss']:.3f} -> {a['loss']:.3f} nats/token; "
            f"bits per byte {b['bits_per_byte']:.3f} -> {a['bits_per_byte']:.3f}.\n\n")


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: stage timings, validation loss, held-out tasks, the loss curve and samples before/after."""
    st = summary["stages"]
    pt = st["pretrain"]
    rows = "\n".join(f"| {name} | {res.get('seconds', '')} |" for name, res in st.items())
    samples = "\n".join(f"- before: `{b!r}`\n- after: `{a!r}`"
                        for b, a in zip(pt["samples_before"], pt["samples_after"]))
    tasks = "\n".join(_task_lines(st))
    return (f"# lmforge quickstart\n\nTotal: {summary['seconds']} s\n\n| stage | seconds |\n|---|---|\n{rows}\n\n"
            + _val_markdown(pt)
            + (f"Held-out tasks:\n\n```\n{tasks}\n```\n\n" if tasks else "")
            + f"![loss curve](pretrain/loss.png)\n\n## Samples\n\n{samples}\n")
