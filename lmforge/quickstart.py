"""`lmforge quickstart`: the lifecycle end to end on a corpus every machine with Python already has.

Stages, each in its own folder under run_dir with a `done.json` once finished:
corpus -> clean -> tokenizer -> shards -> pretrain -> sft -> dpo (LoRA) -> eval, then report.html.
A second run reuses finished stages (`--fresh` redoes all, `--rerun sft dpo` redoes some); an
interrupted pretraining resumes from its last checkpoint; `--skip dpo` leaves optional stages out.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint.store import latest_checkpoint
from lmforge.core.config import from_dict, option, save_config, suggest, to_dict
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.files import atomic_write_json, atomic_write_text
from lmforge.data.corpus import build_stdlib_corpus
from lmforge.data.mixture import SourceConfig, concat_shards
from lmforge.data.pipeline import clean_documents
from lmforge.data.readers import read_documents
from lmforge.data.shards import ShardSet
from lmforge.eval.decontam import find_contamination, task_texts
from lmforge.eval.harness import run_tasks, strip_examples
from lmforge.eval.make_tasks import make_cloze_task, make_synthetic_task, texts_from_source
from lmforge.eval.report import write_report
from lmforge.eval.tasks import load_task
from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer, load_model
from lmforge.model.encdec import build_model
from lmforge.model.io import read_model_config
from lmforge.peft.config import PeftConfig, load_trained
from lmforge.posttrain.dpo import DpoConfig, run_dpo
from lmforge.posttrain.sft import SftConfig, run_sft
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.pack import tokenize_to_shards
from lmforge.tokenizer.train import train_bpe
from lmforge.train.config import TrainConfig
from lmforge.train.evaluate import evaluate_perplexity
from lmforge.train.pretrain import DataConfig, PretrainConfig, objective_ids, pretrain

STAGES = ("corpus", "clean", "tokenizer", "shards", "pretrain", "sft", "dpo", "eval")
OPTIONAL_STAGES = ("clean", "sft", "dpo", "eval")
# --arch: (model preset, pretraining objective), all sized like `tiny` in active parameters.
ARCHES = {"llama": ("tiny", "causal"), "moe": ("moe-tiny", "causal"), "mla": ("mla-tiny", "causal"),
          "prefix": ("prefix-tiny", "prefix_lm"), "t5": ("t5-tiny", "span_corruption")}
DECODER_ONLY_STAGES = ("sft", "dpo", "eval")  # they generate with a decoder-only model; t5 stops after pretrain


# The shards stage writes one shard set per corpus source; pretraining mixes them. The English docs are
# ~7% of the corpus's tokens and upweighted to 20% (~2.7 epochs at the defaults), the way curated corpora
# repeat their high-quality parts (The Pile, Gao et al. 2020, Table 1); code gets the rest (~0.8 epochs).
QUICKSTART_MIXTURE = [SourceConfig(path="stdlib-code", weight=0.8, max_epochs=2),
                      SourceConfig(path="pydoc-topics", weight=0.2, max_epochs=4)]


def _default_pretrain() -> PretrainConfig:
    # ~5 minutes on 2 CPU cores with bf16 autocast: enough for clearly structured Python-like text.
    return PretrainConfig(
        run_dir="",
        model=from_dict(ModelConfig, {"preset": "tiny"}),
        data=DataConfig(path="", seq_len=256, batch_size=16, sources=copy.deepcopy(QUICKSTART_MIXTURE)),
        train=TrainConfig(steps=400, lr=2e-3, warmup_steps=40, compile=True, eval_every=100, eval_batches=10,
                          save_every=100, log_every=10, plot_every=50),
    )


QUICKSTART_TASKS = ["copy", "reverse", "sort", "count_letter"]


def _default_sft() -> SftConfig:
    # Task kinds a few-million-parameter model learns in minutes (held-out `add`/`spell` prompts need more
    # generalization than that). The eval stage measures exact match, so SFT itself skips it.
    return SftConfig(tasks=6000, task_kinds=list(QUICKSTART_TASKS), eval_tasks=0, max_len=128, batch_size=8,
                     train=TrainConfig(steps=400, lr=1.5e-3, warmup_steps=20, eval_every=0, save_every=100,
                                       log_every=10, plot_every=50))


def _default_dpo() -> DpoConfig:
    return DpoConfig(synthetic_pairs=600, max_len=128, batch_size=16, peft=PeftConfig(method="lora"),
                     train=TrainConfig(steps=60, lr=2e-3, warmup_steps=5, weight_decay=0.0, eval_every=30,
                                       save_every=30, log_every=5, plot_every=0))


@dataclass
class QuickstartConfig:
    run_dir: str = option("runs/quickstart", "where every stage writes its outputs (runs/quickstart-ARCH for "
                                              "another --arch)")
    arch: str = option("llama", "architecture: llama (dense GQA decoder), moe (top-2 of 8 experts), mla "
                                "(DeepSeek latent attention), prefix (prefix LM), t5 (encoder-decoder with span "
                                "corruption; post-training and eval are decoder-only, so it stops after pretrain)")
    fresh: bool = option(False, "redo every stage even if a previous run finished it")
    rerun: list[str] = option(default_factory=list, help=f"stages to redo although finished: {', '.join(STAGES)}")
    skip: list[str] = option(default_factory=list, help=f"optional stages to leave out: {', '.join(OPTIONAL_STAGES)}")
    corpus_max_bytes: int = option(6_000_000, "bytes of stdlib code and docs to put in the corpus")
    clean_steps: list[str] = option(default_factory=lambda: ["exact_dedup", "minhash", "pii"],
                                    help="cleaning steps (`lmforge data clean --help`); the web-text quality "
                                         "filters would reject source code, so the default only de-duplicates "
                                         "and redacts PII")
    vocab_size: int = option(4096, "BPE vocabulary size")
    prompts: list[str] = option(default_factory=lambda: ["def parse_args(", "The module ", "class Stack:\n"],
                                help="prompts sampled before and after pretraining")
    sample_tokens: int = option(60, "new tokens per sample")
    eval_examples: int = option(60, "held-out synthetic task examples scored by exact match")
    cloze_examples: int = option(200, "cloze multiple-choice examples from held-out corpus text (at most)")
    pretrain: PretrainConfig = option(default_factory=_default_pretrain, help="the pretraining stage")
    sft: SftConfig = field(default_factory=_default_sft, metadata={"help": "supervised fine-tuning on the "
                                                                           "synthetic task suite"})
    dpo: DpoConfig = field(default_factory=_default_dpo, metadata={"help": "DPO with LoRA on synthetic "
                                                                           "preference pairs"})

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            hint = suggest(self.arch, ARCHES)
            raise ConfigError(f"arch: unknown architecture '{self.arch}'" + (f" (did you mean '{hint}'?)" if hint
                              else "") + f"; choose from {', '.join(ARCHES)}")
        for key, names, allowed in (("rerun", self.rerun, STAGES), ("skip", self.skip, OPTIONAL_STAGES)):
            for name in names:
                if name not in allowed:
                    hint = suggest(name, allowed)
                    raise ConfigError(f"{key}: unknown stage '{name}'" + (f" (did you mean '{hint}'?)" if hint else "")
                                      + f"; choose from {', '.join(allowed)}")


class Stages:
    """Runs named stages once: a finished stage leaves `done.json` with its results."""

    def __init__(self, run_dir: Path, fresh: bool, rerun: list[str] | None = None,
                 skip: list[str] | None = None) -> None:
        self.run_dir, self.fresh = run_dir, fresh
        self.rerun, self.skip = set(rerun or ()), set(skip or ())
        self.results: dict[str, Any] = {}

    def run(self, name: str, fn: Callable[[Path], dict[str, Any]], resumable: bool = False) -> dict[str, Any] | None:
        """`resumable` stages keep an unfinished folder (their checkpoints) instead of starting afresh."""
        if name in self.skip:
            print(f"[quickstart] {name}: skipped")
            return None
        out = self.run_dir / name
        marker = out / "done.json"
        redo = self.fresh or name in self.rerun
        if marker.is_file() and not redo:
            print(f"[quickstart] {name}: reusing {out} (finished earlier; --rerun {name} redoes it)")
            result = json.loads(marker.read_text())
        else:
            if out.exists() and (redo or not resumable):
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

    return build_stdlib_corpus(out / "corpus.jsonl", max_bytes=max_bytes)


def _clean(out: Path, corpus: Path, steps: list[str]) -> dict[str, Any]:

    stats = clean_documents([corpus], out, steps=steps, overwrite=True)
    return {"docs_in": stats["docs_in"], "docs_kept": stats["docs_kept"], "steps": steps,
            "docs_per_second": stats.get("docs_per_second"), "kept_dir": str(out / "kept")}


def _tokenizer(out: Path, corpus: Path, vocab_size: int) -> dict[str, Any]:

    tok = train_bpe((d.text for d in read_documents([corpus])), vocab_size=vocab_size)
    tok.save(out)
    return {"vocab_size": tok.vocab_size, "sha256": tok.sha256}


def _shards(out: Path, corpus: Path, tokenizer_dir: Path) -> dict[str, Any]:
    """One shard set per corpus source (OUT/<source>/{train,val}, the pretraining mixture's sources) and
    their union OUT/{train,val}, which evaluation reads; each document is in exactly one split."""

    tokenizer = Tokenizer.load(tokenizer_dir)
    by_source = out / "by_source"
    by_source.mkdir()
    files: dict[str, Any] = {}
    try:
        for doc in read_documents([corpus]):
            name = str(doc.metadata.get("source") or "other").replace("/", "-")
            if name not in files:
                files[name] = open(by_source / f"{name}.jsonl", "w", encoding="utf-8")
            files[name].write(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")
    finally:
        for f in files.values():
            f.close()
    sources = {}
    for name in sorted(files):
        summary = tokenize_to_shards([by_source / f"{name}.jsonl"], tokenizer, out / name, val_fraction=0.02)
        sources[name] = {"train_tokens": summary["train"]["n_tokens"], "train_docs": summary["train"]["n_docs"]}
    shutil.rmtree(by_source)
    train = concat_shards([out / name / "train" for name in sorted(files)], out / "train")
    val_dirs = [out / name / "val" for name in sorted(files) if (out / name / "val" / "index.json").is_file()]
    val = concat_shards(val_dirs, out / "val") if val_dirs else {}
    tokenizer.save(out)
    return {"train_tokens": train["n_tokens"], "val_tokens": val.get("n_tokens", 0), "train_docs": train["n_docs"],
            "sources": sources}


def _samples(model: Transformer, tokenizer: Any, prompts: list[str], n_tokens: int) -> list[str]:
    """Sampled continuations; an encoder-decoder fills a masked span after each prompt instead (greedy)."""

    texts = []
    for i, prompt in enumerate(prompts):
        if model.cfg.arch == "encdec":
            sentinel = tokenizer.vocab_size  # the first sentinel id sits right past the tokenizer's ids
            out = generate(model, tokenizer.encode(prompt) + [sentinel],
                           SamplingParams(greedy=True, max_new_tokens=n_tokens))
            texts.append(prompt + "<span>" + tokenizer.decode([t for t in out if t < sentinel]))
            continue
        params = SamplingParams(temperature=0.8, top_k=50, max_new_tokens=n_tokens, seed=i,
                                stop_token_ids=[tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        ids = generate(model, tokenizer.encode(prompt), params)
        texts.append(prompt + tokenizer.decode(ids))
    return texts


def _val_metrics(model: Transformer, shards_dir: Path, seq_len: int) -> dict[str, float] | None:
    """Held-out perplexity and bits per byte (None for an encoder-decoder: it is a decoder-only measure)."""

    if model.cfg.arch == "encdec":
        return None
    return evaluate_perplexity(model, ShardSet(shards_dir / "val"), seq_len=seq_len, batch_size=8, max_batches=20)


def _eval(out: Path, run_dir: Path, models: dict[str, tuple[str, str | None]], n_tasks: int, n_cloze: int,
          kinds: list[str]) -> dict[str, Any]:
    """Every model on the same held-out synthetic tasks (exact match) and corpus cloze (log-likelihood)."""

    tasks = out / "tasks"
    synthetic = load_task(make_synthetic_task(tasks, n=n_tasks, kinds=kinds))
    notes = []
    try:  # held-out prose sentences; a small or code-only validation split may have none
        make_cloze_task(tasks, run_dir / "shards" / "val", tokenizer_dir=run_dir / "tokenizer", n=n_cloze)
    except LmforgeError as e:
        notes.append(f"cloze task left out: {e}")
        print(f"note: {notes[-1]}", file=sys.stderr)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    scores: dict[str, Any] = {}
    for label, (checkpoint, adapter) in models.items():
        results = run_tasks(load_trained(checkpoint, adapter), tokenizer, [tasks], batch_size=32)
        atomic_write_json(out / f"{label}.json", {"checkpoint": checkpoint, "adapter": adapter, "tasks": results})
        scores[label] = strip_examples(results)
        scores[label]["samples"] = [
            {"prompt": synthetic.examples[r["index"]].fields["prompt"], "output": r["output"],
             "answer": r["answers"][0]} for r in results["synthetic"]["examples"][:3]]
    contamination = find_contamination(task_texts([tasks]),
                                       texts_from_source(run_dir / "shards" / "train", run_dir / "tokenizer"))
    atomic_write_json(out / "decontam.json", contamination)
    contaminated = {task: f"{t['contaminated']} of {t['examples']}" for task, t in contamination["tasks"].items()}
    return {"models": scores, "contaminated": contaminated, "notes": notes}


def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:

    _apply_arch(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "quickstart_config.json")
    start = time.perf_counter()
    stages = Stages(run_dir, cfg.fresh, cfg.rerun, cfg.skip)

    corpus = run_dir / "corpus" / "corpus.jsonl"
    stages.run("corpus", lambda out: _corpus(out, cfg.corpus_max_bytes))
    if stages.run("clean", lambda out: _clean(out, corpus, cfg.clean_steps)) is not None:
        corpus = run_dir / "clean" / "kept"
    stages.run("tokenizer", lambda out: _tokenizer(out, corpus, cfg.vocab_size))
    stages.run("shards", lambda out: _shards(out, corpus, run_dir / "tokenizer"))

    pt = cfg.pretrain
    pt.run_dir = pt.run_dir or str(run_dir / "pretrain")
    pt.data.path = pt.data.path or str(run_dir / "shards")
    tokenizer = Tokenizer.load(run_dir / "tokenizer")

    def _pretrain(out: Path) -> dict[str, Any]:
        vocab = objective_ids(pt, tokenizer.vocab_size).vocab_size  # + sentinels for span corruption
        model_cfg = from_dict(ModelConfig, {**_model_dict(pt.model), "vocab_size": vocab})
        torch.manual_seed(pt.train.seed)
        untrained = build_model(model_cfg).eval()
        before = _val_metrics(untrained, Path(pt.data.path), pt.data.seq_len)
        samples_before = _samples(untrained, tokenizer, cfg.prompts, cfg.sample_tokens)
        pt.resume = latest_checkpoint(pt.run_dir) is not None  # an interrupted run continues
        result = pretrain(pt)
        trained = load_model(result["model_dir"])
        after = _val_metrics(trained, Path(pt.data.path), pt.data.seq_len)
        samples_after = _samples(trained, tokenizer, cfg.prompts, cfg.sample_tokens)
        return {**result, "val_before": before, "val_after": after,
                "samples_before": samples_before, "samples_after": samples_after}

    base_model = stages.run("pretrain", _pretrain, resumable=True)["model_dir"]
    models: dict[str, tuple[str, str | None]] = {"base": (base_model, None)}
    sft_model = base_model
    if stages.run("sft", lambda out: _posttrain(run_sft, cfg.sft, out, base_model), resumable=True):
        sft_model = stages.results["sft"]["model_dir"]
        models["sft"] = (sft_model, None)
    if stages.run("dpo", lambda out: _posttrain(run_dpo, cfg.dpo, out, sft_model), resumable=True):
        models["dpo"] = (sft_model, stages.results["dpo"]["model_dir"]) if cfg.dpo.peft.method != "none" \
            else (stages.results["dpo"]["model_dir"], None)
    stages.run("eval", lambda out: _eval(out, run_dir, models, cfg.eval_examples, cfg.cloze_examples,
                                         cfg.sft.task_kinds))

    summary = {"run_dir": str(run_dir), "seconds": round(time.perf_counter() - start, 1), "stages": stages.results,
               "models": {k: {"checkpoint": c, "adapter": a} for k, (c, a) in models.items()}}
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "summary.md", _summary_markdown(summary))
    report = write_report(run_dir)
    print(_summary_text(summary, report))
    return summary


def _apply_arch(cfg: QuickstartConfig) -> None:
    """Point the pretraining stage at `cfg.arch`'s preset and objective, in a run directory of its own.
    A model preset other than `tiny` given by the user wins."""
    if cfg.arch == "llama":
        return
    if cfg.run_dir == "runs/quickstart":
        cfg.run_dir = f"runs/quickstart-{cfg.arch}"
    preset, cfg.pretrain.objective = ARCHES[cfg.arch]
    if cfg.pretrain.model.preset == "tiny":  # keep the user's changes to tiny on top of the arch's preset
        tiny = _model_dict(from_dict(ModelConfig, {"preset": "tiny"}))
        changed = {k: v for k, v in _model_dict(cfg.pretrain.model).items() if tiny.get(k) != v}
        cfg.pretrain.model = from_dict(ModelConfig, {"preset": preset, **changed})
    if cfg.arch == "t5":
        cfg.pretrain.train.compile = False  # its first compiled step takes minutes on 2 cores
        cfg.skip = sorted(set(cfg.skip) | set(DECODER_ONLY_STAGES))
    lora = cfg.dpo.peft.lora
    if cfg.arch == "mla" and lora.targets == ["q_proj", "v_proj"]:
        lora.targets = ["o_proj", "gate_proj", "up_proj", "down_proj"]  # MLA has no q/v projections LoRA maps


def _posttrain(run: Callable[[Any], dict[str, Any]], stage_cfg: Any, out: Path, checkpoint: str) -> dict[str, Any]:
    """Run an SFT/DPO-style stage in `out`, resuming its checkpoints when a previous run was cut short."""
    stage_cfg.checkpoint = stage_cfg.checkpoint or checkpoint
    stage_cfg.run_dir = str(out)
    stage_cfg.resume = latest_checkpoint(out) is not None
    return run(stage_cfg)


def _model_dict(cfg: ModelConfig) -> dict[str, Any]:

    data = to_dict(cfg)
    data.pop("preset", None)
    return data


def _metric(stages: dict[str, Any], label: str, task: str, metric: str) -> float | None:
    return (stages.get("eval") or {}).get("models", {}).get(label, {}).get(task, {}).get(metric)


def _task_lines(st: dict[str, Any]) -> list[str]:
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


def _summary_text(summary: dict[str, Any], report: Path) -> str:
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
        lines.append(f"  lmforge chat --checkpoint {chat['checkpoint']}{adapter}      "
                     "(try: reverse: a b c, or add: 3 + 4)")
        if not read_model_config(pt["model_dir"]).prefix_lm:  # serve decodes causal decoders only
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


def _summary_markdown(summary: dict[str, Any]) -> str:
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
