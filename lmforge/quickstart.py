"""`lmforge quickstart`: the lifecycle end to end on a corpus every machine with Python already has.

Stages, each in its own folder under run_dir with a `done.json` once finished:
corpus -> clean -> tokenizer -> shards -> pretrain -> sft -> dpo (LoRA) -> eval -> reasoning (SFT on the
<think> task family, a PRM, the test-time compute curve of greedy / vote / PRM beam search on held-out
problems), then report.html. A second run reuses finished stages (`--fresh` redoes all, `--rerun sft dpo`
redoes some); an interrupted pretraining resumes from its last checkpoint; `--skip dpo reasoning` leaves
optional stages out.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint.store import latest_checkpoint
from lmforge.core.config import from_dict, option, save_config, suggest
from lmforge.core.errors import ConfigError
from lmforge.core.files import atomic_write_json, atomic_write_text
from lmforge.data.corpus import build_stdlib_corpus
from lmforge.data.mixture import SourceConfig
from lmforge.data.pipeline import clean_documents
from lmforge.data.readers import read_documents
from lmforge.eval.heldout import evaluate_models
from lmforge.eval.report import write_report
from lmforge.eval.snapshot import snapshot
from lmforge.eval.summary import machine_info, summary_markdown, summary_text
from lmforge.model import ModelConfig, load_model
from lmforge.model.encdec import build_model
from lmforge.model.variants import rebase_preset, with_fields
from lmforge.peft.config import PeftConfig
from lmforge.posttrain.dpo import DpoConfig, run_dpo
from lmforge.posttrain.models import load_policy
from lmforge.posttrain.prm import PrmConfig, run_prm
from lmforge.posttrain.search import SearchSettings, search_curve
from lmforge.posttrain.sft import SftConfig, run_sft
from lmforge.tasks.reasoning import ReasoningDataConfig, StepRange, write_reasoning_data
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.pack import tokenize_by_source
from lmforge.tokenizer.train import train_bpe
from lmforge.train.config import TrainConfig
from lmforge.train.pretrain import DataConfig, PretrainConfig, objective_ids, pretrain

STAGES = ("corpus", "clean", "tokenizer", "shards", "pretrain", "sft", "dpo", "eval", "reasoning")
OPTIONAL_STAGES = ("clean", "sft", "dpo", "eval", "reasoning")
# --arch: (model preset, pretraining objective), all sized like `tiny` in active parameters.
ARCHES = {"llama": ("tiny", "causal"), "moe": ("moe-tiny", "causal"), "mla": ("mla-tiny", "causal"),
          "prefix": ("prefix-tiny", "prefix_lm"), "t5": ("t5-tiny", "span_corruption")}
# they generate with a decoder-only model; t5 stops after pretrain
DECODER_ONLY_STAGES = ("sft", "dpo", "eval", "reasoning")


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


@dataclass
class ReasoningStageConfig(StepRange):
    """The reasoning stage: SFT on solved <think> problems, a Math-Shepherd PRM, search on held-out problems, all
    with `min_steps`..`max_steps` reasoning steps (a longer range is harder: more room for search)."""

    problems: int = option(3000, "solved training problems for SFT")
    sft: SftConfig = field(default_factory=lambda: SftConfig(
        eval_tasks=0, max_len=96, batch_size=16, train=TrainConfig(steps=300, lr=1.5e-3, warmup_steps=20, eval_every=0,
                                                                   save_every=100, log_every=10, plot_every=0)),
        metadata={"help": "SFT of the sft stage's model on the reasoning problems"})
    prm: PrmConfig = field(default_factory=lambda: PrmConfig(
        problems=48, heldout_problems=24, samples=2, rollouts=3, max_new_tokens=48, batch_size=8,
        train=TrainConfig(steps=60, lr=5e-5, warmup_steps=5, weight_decay=0.0, eval_every=0, save_every=0,
                          log_every=10, plot_every=0)), metadata={"help": "the process reward model"})
    search: SearchSettings = field(default_factory=lambda: SearchSettings(
        methods=["greedy", "vote", "beam"], problems=32, n=4, beam_width=2, expansions=2, max_new_tokens=48,
        scales=[1, 2]), metadata={"help": "test-time search on held-out problems (the PRM is the prm stage's)"})


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
    reasoning: ReasoningStageConfig = field(default_factory=ReasoningStageConfig,
                                            metadata={"help": "the reasoning stage (--skip reasoning leaves it out)"})

    def __post_init__(self) -> None:
        _one_of("arch", "architecture", self.arch, list(ARCHES))
        for key, names, allowed in (("rerun", self.rerun, STAGES), ("skip", self.skip, OPTIONAL_STAGES)):
            for name in names:
                _one_of(key, "stage", name, allowed)


def _one_of(key: str, what: str, name: str, allowed: Sequence[str]) -> None:
    if name not in allowed:
        hint = suggest(name, allowed)
        raise ConfigError(f"{key}: unknown {what} '{name}'" + (f" (did you mean '{hint}'?)" if hint else "")
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


def _clean(out: Path, corpus: Path, steps: list[str]) -> dict[str, Any]:
    stats = clean_documents([corpus], out, steps=steps, overwrite=True)
    return {"docs_in": stats["docs_in"], "docs_kept": stats["docs_kept"], "steps": steps,
            "docs_per_second": stats.get("docs_per_second"), "kept_dir": str(out / "kept")}


def _tokenizer(out: Path, corpus: Path, vocab_size: int) -> dict[str, Any]:
    tok = train_bpe((d.text for d in read_documents([corpus])), vocab_size=vocab_size)
    tok.save(out)
    return {"vocab_size": tok.vocab_size, "sha256": tok.sha256}


def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    """Every stage in order (each one a library call), then summary.json, summary.md and report.html."""
    _apply_arch(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "quickstart_config.json")
    start = time.perf_counter()
    stages = Stages(run_dir, cfg.fresh, cfg.rerun, cfg.skip)

    corpus = run_dir / "corpus" / "corpus.jsonl"
    stages.run("corpus", lambda out: build_stdlib_corpus(out / "corpus.jsonl", max_bytes=cfg.corpus_max_bytes))
    if stages.run("clean", lambda out: _clean(out, corpus, cfg.clean_steps)) is not None:
        corpus = run_dir / "clean" / "kept"
    stages.run("tokenizer", lambda out: _tokenizer(out, corpus, cfg.vocab_size))
    # one shard set per source (the pretraining mixture's) and their union (what evaluation reads)
    stages.run("shards", lambda out: tokenize_by_source(corpus, Tokenizer.load(run_dir / "tokenizer"), out,
                                                        val_fraction=0.02))

    pt = cfg.pretrain
    pt.run_dir = pt.run_dir or str(run_dir / "pretrain")
    pt.data.path = pt.data.path or str(run_dir / "shards")
    tokenizer = Tokenizer.load(run_dir / "tokenizer")

    def _pretrain(out: Path) -> dict[str, Any]:
        vocab = objective_ids(pt, tokenizer.vocab_size).vocab_size  # + sentinels for span corruption
        torch.manual_seed(pt.train.seed)
        untrained = build_model(with_fields(pt.model, vocab_size=vocab)).eval()
        look = (tokenizer, Path(pt.data.path), pt.data.seq_len, cfg.prompts, cfg.sample_tokens)
        before = snapshot(untrained, *look)
        pt.resume = latest_checkpoint(pt.run_dir) is not None  # an interrupted run continues
        result = pretrain(pt)
        trained = load_model(result["model_dir"])
        after = snapshot(trained, *look)
        return {**result, "val_before": before["val"], "val_after": after["val"], "prefix_lm": trained.cfg.prefix_lm,
                "samples_before": before["samples"], "samples_after": after["samples"]}

    base_model = stages.run("pretrain", _pretrain, resumable=True)["model_dir"]
    models: dict[str, tuple[str, str | None]] = {"base": (base_model, None)}
    sft_model = base_model
    if stages.run("sft", lambda out: _posttrain(run_sft, cfg.sft, out, base_model), resumable=True):
        sft_model = stages.results["sft"]["model_dir"]
        models["sft"] = (sft_model, None)
    if stages.run("dpo", lambda out: _posttrain(run_dpo, cfg.dpo, out, sft_model), resumable=True):
        models["dpo"] = (sft_model, stages.results["dpo"]["model_dir"]) if cfg.dpo.peft.method != "none" \
            else (stages.results["dpo"]["model_dir"], None)
    stages.run("eval", lambda out: evaluate_models(out, models, run_dir / "tokenizer", run_dir / "shards",
                                                   cfg.eval_examples, cfg.cloze_examples, cfg.sft.task_kinds))
    stages.run("reasoning", lambda out: run_reasoning_stage(cfg.reasoning, out, sft_model), resumable=True)

    summary = {"run_dir": str(run_dir), "seconds": round(time.perf_counter() - start, 1), "stages": stages.results,
               "models": {k: {"checkpoint": c, "adapter": a} for k, (c, a) in models.items()},
               "machine": machine_info(), "task_kinds": list(cfg.sft.task_kinds)}
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "summary.md", summary_markdown(summary))
    report = write_report(run_dir)
    print(summary_text(summary, report))
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
        cfg.pretrain.model = rebase_preset(cfg.pretrain.model, preset, base="tiny")
    if cfg.arch == "t5":
        cfg.pretrain.train.compile = False  # its first compiled step takes minutes on 2 cores
        cfg.skip = sorted(set(cfg.skip) | set(DECODER_ONLY_STAGES))
    lora = cfg.dpo.peft.lora
    if cfg.arch == "mla" and lora.targets == ["q_proj", "v_proj"]:
        lora.targets = ["o_proj", "gate_proj", "up_proj", "down_proj"]  # MLA has no q/v projections LoRA maps


def run_reasoning_stage(cfg: ReasoningStageConfig, out: Path, checkpoint: str) -> dict[str, Any]:
    """SFT `checkpoint` on solved reasoning problems, train a PRM on its rollout labels (when a search method
    scores steps and no PRM is given), then search held-out problems: the result holds the PRM's step accuracy
    and `test_time_curve` (accuracy vs generated tokens per method, the run report's curve); the headline is
    printed."""
    for key, nested in (("prm", cfg.prm), ("search", cfg.search)):
        pair, default = (nested.min_steps, nested.max_steps), (StepRange().min_steps, StepRange().max_steps)
        if pair not in (default, (cfg.min_steps, cfg.max_steps)):
            raise ConfigError(f"reasoning.{key}.min_steps/max_steps {pair} differ from reasoning.min_steps/max_steps "
                              f"{(cfg.min_steps, cfg.max_steps)}; set the stage's range, which all its parts share")
        nested.min_steps, nested.max_steps = cfg.min_steps, cfg.max_steps
    data = write_reasoning_data(ReasoningDataConfig(out=str(out / "data.jsonl"), problems=cfg.problems,
                                                    min_steps=cfg.min_steps, max_steps=cfg.max_steps))
    cfg.sft.data = cfg.sft.data or [str(data)]
    sft = _posttrain(run_sft, cfg.sft, out / "sft", checkpoint)
    # a PRM only when a search method scores steps and none was given
    prm = (_posttrain(run_prm, cfg.prm, out / "prm", sft["model_dir"])
           if cfg.search.step_scored() and not cfg.search.prm and not cfg.search.oracle else None)
    cfg.search.prm = cfg.search.prm or (prm["model_dir"] if prm else "")
    cfg.search.require_scorers("reasoning.search.")
    policy, tokenizer = load_policy(sft["model_dir"])
    curve, _ = search_curve(cfg.search, policy, tokenizer)
    points = curve["test_time_curve"]
    print("[quickstart] reasoning: held-out accuracy vs generated tokens per problem" + (
        f" (PRM step accuracy {prm['step_accuracy']:.3f}, balanced {prm['balanced_step_accuracy']:.3f}):"
        if prm else ":"))
    for p in points:
        print(f"  {p['method']:<8} {p['tokens']:7.1f} tokens  accuracy {p['accuracy']:.3f} +- {p['stderr']:.3f}")
    trained = {f"prm_{k}": prm[k] for k in ("step_accuracy", "balanced_step_accuracy", "good_step_share",
                                             "label_agreement")} if prm else {}
    return {"model_dir": sft["model_dir"], "prm_dir": cfg.search.prm, **trained, "search": curve["methods"],
            "test_time_curve": points, "curve": curve["curve"]}


def _posttrain(run: Callable[[Any], dict[str, Any]], stage_cfg: Any, out: Path, checkpoint: str) -> dict[str, Any]:
    """Run an SFT/DPO-style stage in `out`, resuming its checkpoints when a previous run was cut short."""
    stage_cfg.checkpoint = stage_cfg.checkpoint or checkpoint
    stage_cfg.run_dir = str(out)
    stage_cfg.resume = latest_checkpoint(out) is not None
    return run(stage_cfg)
