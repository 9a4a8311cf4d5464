"""`lmforge quickstart`: the lifecycle end to end on a corpus every machine with Python already has.

Stages (each writes its own folder under run_dir and a `done.json`; a second run reuses finished
stages, `--fresh` redoes them; an interrupted pretraining resumes from its last checkpoint):
corpus -> tokenizer -> shards -> pretrain -> samples and eval.
Later stages of the project (cleaning, SFT, preference tuning, reports) add themselves here.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import from_dict, option, save_config
from lmforge.files import atomic_write_json, atomic_write_text
from lmforge.model import ModelConfig, Transformer, load_model
from lmforge.train.checkpoint import latest_checkpoint
from lmforge.train.trainer import DataConfig, PretrainConfig, TrainConfig


def _default_pretrain() -> PretrainConfig:
    # ~5 minutes on 2 CPU cores with bf16 autocast: enough for clearly structured Python-like text.
    return PretrainConfig(
        run_dir="",
        model=from_dict(ModelConfig, {"preset": "tiny"}),
        data=DataConfig(path="", seq_len=256, batch_size=16),
        train=TrainConfig(steps=400, lr=2e-3, warmup_steps=40, compile=True, eval_every=100, eval_batches=10,
                          save_every=100, log_every=10, plot_every=50),
    )


@dataclass
class QuickstartConfig:
    run_dir: str = option("runs/quickstart", "where every stage writes its outputs")
    fresh: bool = option(False, "redo every stage even if a previous run finished it")
    corpus_max_bytes: int = option(6_000_000, "bytes of stdlib code and docs to put in the corpus")
    vocab_size: int = option(4096, "BPE vocabulary size")
    prompts: list[str] = option(default_factory=lambda: ["def parse_args(", "The module ", "class Stack:\n"],
                                help="prompts sampled before and after pretraining")
    sample_tokens: int = option(60, "new tokens per sample")
    pretrain: PretrainConfig = option(default_factory=_default_pretrain, help="the pretraining stage")


class Stages:
    """Runs named stages once: a finished stage leaves `done.json` with its results."""

    def __init__(self, run_dir: Path, fresh: bool) -> None:
        self.run_dir, self.fresh = run_dir, fresh
        self.results: dict[str, Any] = {}

    def run(self, name: str, fn: Callable[[Path], dict[str, Any]], resumable: bool = False) -> dict[str, Any]:
        """`resumable` stages keep an unfinished folder (their checkpoints) instead of starting afresh."""
        out = self.run_dir / name
        marker = out / "done.json"
        if marker.is_file() and not self.fresh:
            print(f"[quickstart] {name}: reusing {out} (finished earlier; --fresh redoes it)")
            result = json.loads(marker.read_text())
        else:
            if out.exists() and (self.fresh or not resumable):
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            print(f"[quickstart] {name} ...")
            start = time.perf_counter()
            result = fn(out)
            result["seconds"] = round(time.perf_counter() - start, 1)
            atomic_write_json(marker, result)
            print(f"[quickstart] {name} done in {result['seconds']} s")
        self.results[name] = result
        return result


def _corpus(out: Path, max_bytes: int) -> dict[str, Any]:
    from lmforge.data.corpus import build_stdlib_corpus

    return build_stdlib_corpus(out / "corpus.jsonl", max_bytes=max_bytes)


def _tokenizer(out: Path, corpus: Path, vocab_size: int) -> dict[str, Any]:
    from lmforge.data.readers import read_documents
    from lmforge.tokenizer import train_bpe

    tok = train_bpe((d.text for d in read_documents([corpus])), vocab_size=vocab_size)
    tok.save(out)
    return {"vocab_size": tok.vocab_size, "sha256": tok.sha256}


def _shards(out: Path, corpus: Path, tokenizer_dir: Path) -> dict[str, Any]:
    from lmforge.data.tokenize import tokenize_to_shards
    from lmforge.tokenizer import Tokenizer

    summary = tokenize_to_shards([corpus], Tokenizer.load(tokenizer_dir), out, val_fraction=0.02)
    val = summary.get("val") or {}
    return {"train_tokens": summary["train"]["n_tokens"], "val_tokens": val.get("n_tokens", 0),
            "train_docs": summary["train"]["n_docs"]}


def _samples(model: Transformer, tokenizer: Any, prompts: list[str], n_tokens: int) -> list[str]:
    from lmforge.generate.engine import generate
    from lmforge.generate.sampling import SamplingParams

    texts = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0.8, top_k=50, max_new_tokens=n_tokens, seed=i,
                                stop_token_ids=[tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        ids = generate(model, tokenizer.encode(prompt), params)
        texts.append(prompt + tokenizer.decode(ids))
    return texts


def _val_metrics(model: Transformer, shards_dir: Path, seq_len: int) -> dict[str, float]:
    from lmforge.data.shards import ShardSet
    from lmforge.eval.perplexity import evaluate_perplexity

    return evaluate_perplexity(model, ShardSet(shards_dir / "val"), seq_len=seq_len, batch_size=8, max_batches=20)


def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.trainer import pretrain

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "quickstart_config.json")
    start = time.perf_counter()
    stages = Stages(run_dir, cfg.fresh)

    corpus = run_dir / "corpus" / "corpus.jsonl"
    stages.run("corpus", lambda out: _corpus(out, cfg.corpus_max_bytes))
    stages.run("tokenizer", lambda out: _tokenizer(out, corpus, cfg.vocab_size))
    stages.run("shards", lambda out: _shards(out, corpus, run_dir / "tokenizer"))

    pt = cfg.pretrain
    pt.run_dir = pt.run_dir or str(run_dir / "pretrain")
    pt.data.path = pt.data.path or str(run_dir / "shards")
    tokenizer = Tokenizer.load(run_dir / "tokenizer")

    def _pretrain(out: Path) -> dict[str, Any]:
        model_cfg = from_dict(ModelConfig, {**_model_dict(pt.model), "vocab_size": tokenizer.vocab_size})
        torch.manual_seed(pt.train.seed)
        untrained = Transformer(model_cfg).eval()
        before = _val_metrics(untrained, Path(pt.data.path), pt.data.seq_len)
        samples_before = _samples(untrained, tokenizer, cfg.prompts, cfg.sample_tokens)
        pt.resume = latest_checkpoint(pt.run_dir) is not None  # an interrupted run continues
        result = pretrain(pt)
        trained = load_model(result["model_dir"])
        after = _val_metrics(trained, Path(pt.data.path), pt.data.seq_len)
        samples_after = _samples(trained, tokenizer, cfg.prompts, cfg.sample_tokens)
        return {**result, "val_before": before, "val_after": after,
                "samples_before": samples_before, "samples_after": samples_after}

    stages.run("pretrain", _pretrain, resumable=True)
    summary = {"run_dir": str(run_dir), "seconds": round(time.perf_counter() - start, 1), "stages": stages.results}
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "summary.md", _summary_markdown(summary))
    print(_summary_text(summary))
    return summary


def _model_dict(cfg: ModelConfig) -> dict[str, Any]:
    from lmforge.config import to_dict

    data = to_dict(cfg)
    data.pop("preset", None)
    return data


def _summary_text(summary: dict[str, Any]) -> str:
    st = summary["stages"]
    pt = st["pretrain"]
    b, a = pt["val_before"], pt["val_after"]
    lines = [
        "",
        "=" * 72,
        f"lmforge quickstart finished in {summary['seconds']} s  ->  {summary['run_dir']}",
        f"  corpus:    {st['corpus'].get('docs')} documents, "
        f"{st['corpus'].get('bytes', 0) / 1e6:.1f} MB of stdlib code + docs",
        f"  tokenizer: byte-level BPE, {st['tokenizer']['vocab_size']} tokens",
        f"  shards:    {st['shards']['train_tokens']:,} train / {st['shards']['val_tokens']:,} val tokens",
        f"  pretrain:  {pt.get('steps')} steps, {pt.get('tokens_per_s', 0):,.0f} tokens/s",
        f"  val loss:  {b['loss']:.3f} -> {a['loss']:.3f} nats/token;  bits/byte {b['bits_per_byte']:.3f} -> "
        f"{a['bits_per_byte']:.3f}",
        "",
        "samples before pretraining:",
        *[f"  | {s!r}" for s in pt["samples_before"]],
        "samples after pretraining:",
        *[f"  | {s!r}" for s in pt["samples_after"]],
        "",
        "next:",
        f"  lmforge generate --checkpoint {pt['model_dir']} --prompt 'def main(' --max-new-tokens 80",
        f"  lmforge eval --checkpoint {pt['model_dir']} --data {Path(summary['run_dir']) / 'shards'}",
        f"  metrics: {Path(summary['run_dir']) / 'pretrain' / 'metrics.jsonl'}   loss curve: "
        f"{Path(summary['run_dir']) / 'pretrain' / 'loss.png'}",
    ]
    return "\n".join(lines)


def _summary_markdown(summary: dict[str, Any]) -> str:
    pt = summary["stages"]["pretrain"]
    rows = "\n".join(f"| {name} | {res.get('seconds', '')} |" for name, res in summary["stages"].items())
    samples = "\n".join(f"- before: `{b!r}`\n- after: `{a!r}`"
                        for b, a in zip(pt["samples_before"], pt["samples_after"]))
    return (f"# lmforge quickstart\n\nTotal: {summary['seconds']} s\n\n| stage | seconds |\n|---|---|\n{rows}\n\n"
            f"Validation loss {pt['val_before']['loss']:.3f} -> {pt['val_after']['loss']:.3f} nats/token; "
            f"bits per byte {pt['val_before']['bits_per_byte']:.3f} -> {pt['val_after']['bits_per_byte']:.3f}.\n\n"
            f"![loss curve](pretrain/loss.png)\n\n## Samples\n\n{samples}\n")
