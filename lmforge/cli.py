"""`lmforge <command>`: each command is a config dataclass plus the library function that takes it.

The table below is the whole CLI. Modules are imported only when their command runs, so
`lmforge --help` is instant and a stage's dependencies load only when used.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.core.config import parse_config, to_dict
from lmforge.core.errors import LmforgeError, describe_os_error


@dataclass(frozen=True)
class Command:
    module: str
    config: str
    function: str
    summary: str
    recipe: bool = True  # accepts a recipe file as the first positional argument


COMMANDS: dict[str, Command] = {
    "quickstart": Command("lmforge.quickstart", "QuickstartConfig", "run_quickstart",
                          "the whole lifecycle on a corpus built from this machine's Python stdlib"),
    "tokenizer train": Command("lmforge.tokenizer.train", "TokenizerTrainConfig", "train_tokenizer_cmd",
                               "train a BPE / WordPiece / Unigram tokenizer and save tokenizer.json"),
    "tokenizer eval": Command("lmforge.tokenizer.eval", "TokenizerEvalConfig", "tokenizer_eval_cmd",
                              "compression (bytes/token, tokens/word) of several tokenizers side by side"),
    "data tokenize": Command("lmforge.tokenizer.pack", "TokenizeConfig", "tokenize_cmd",
                             "tokenize documents into memory-mapped token shards"),
    "data export-megatron": Command("lmforge.data.megatron", "ExportMegatronConfig", "export_megatron_cmd",
                                    "write a shard set as a Megatron-LM .bin/.idx indexed dataset"),
    "data clean": Command("lmforge.data.pipeline", "CleanConfig", "clean_cmd",
                          "filter, de-duplicate and redact documents (kept/, rejects/, stats.json, report.md)"),
    "data train-classifier": Command("lmforge.data.filters.classifier", "TrainClassifierConfig",
                                     "train_classifier_cmd", "train a hashed n-gram classifier (toxicity, quality) "
                                     "from labelled examples; precision/recall on held-out labels"),
    "pretrain": Command("lmforge.train.pretrain", "PretrainConfig", "pretrain",
                        "pretrain a model on token shards"),
    "plan": Command("lmforge.parallel.plan", "PlanConfig", "plan_cmd",
                    "lay a model out over N GPUs: memory, communication, the fastest layout that fits (no "
                    "fragmentation, buffers or comm/compute overlap modelled)"),
    "sft": Command("lmforge.posttrain.sft", "SftConfig", "run_sft",
                   "supervised fine-tuning on conversations / synthetic tasks (loss on assistant tokens, packing)"),
    "rejection-sample": Command("lmforge.posttrain.rejection", "RejectionConfig", "run_rejection",
                                "best-of-N sampling scored by a verifier or reward model, then SFT on the winners"),
    "rlhf": Command("lmforge.posttrain.iterative", "IterativeRlhfConfig", "run_iterative_rlhf",
                    "LLaMA 2's iterative RLHF: K rounds of rejection sampling, fine-tuning and PPO with one reward"),
    "self-instruct": Command("lmforge.posttrain.self_instruct", "SelfInstructConfig", "run_self_instruct",
                             "Self-Instruct / Alpaca: generate, filter (ROUGE-L, keywords) and write instructions"),
    "eval": Command("lmforge.eval.perplexity", "EvalConfig", "eval_cmd",
                    "perplexity / bits-per-byte on token shards, and task accuracy (--tasks)"),
    "eval make-tasks": Command("lmforge.eval.make_tasks", "MakeTasksConfig", "make_tasks_cmd",
                               "write the synthetic-suite and cloze tasks (YAML + JSONL)"),
    "eval decontam": Command("lmforge.eval.decontam", "DecontamConfig", "decontam_cmd",
                             "n-gram overlap of task examples with training data"),
    "eval context": Command("lmforge.eval.context", "ContextEvalConfig", "context_eval_cmd",
                            "perplexity at 1x, 2x, 4x the original context (before/after a context extension)"),
    "eval winrate": Command("lmforge.eval.pairwise", "WinRateConfig", "win_rate_cmd",
                            "pairwise win rate of two checkpoints (verifier or reward-model judge)"),
    "eval reward-accuracy": Command("lmforge.eval.pairwise", "RewardAccuracyConfig", "reward_accuracy_cmd",
                                    "how often a reward model scores chosen above rejected"),
    "report": Command("lmforge.eval.report", "ReportConfig", "report_cmd",
                      "one self-contained HTML page for a run directory", recipe=False),
    "compare": Command("lmforge.eval.compare", "CompareConfig", "compare_cmd",
                       "overlay two runs' curves and metrics in one HTML page", recipe=False),
    "chat": Command("lmforge.generate.chat", "ChatConfig", "chat_cmd",
                    "chat with a checkpoint in the terminal (chat template, streaming)", recipe=False),
    "generate": Command("lmforge.generate.cli", "GenerateConfig", "generate_cmd",
                        "generate text from a checkpoint (KV cache, greedy or sampling, streaming)", recipe=False),
    "serve": Command("lmforge.serve.app", "ServeConfig", "serve_cmd",
                     "OpenAI-compatible HTTP server + web chat (continuous batching, SSE streaming)", recipe=False),
    "convert from-hf": Command("lmforge.model.hf.convert", "FromHFConfig", "from_hf_cmd",
                               "import a Hugging Face checkpoint (safetensors) of a supported family", recipe=False),
    "convert to-hf": Command("lmforge.model.hf.convert", "ToHFConfig", "to_hf_cmd",
                             "export a checkpoint as a Hugging Face model directory (--family auto)", recipe=False),
    "reward": Command("lmforge.posttrain.reward", "RewardConfig", "run_reward",
                      "train a reward model (scalar head, Bradley-Terry loss) on preference pairs"),
    "dpo": Command("lmforge.posttrain.dpo", "DpoConfig", "run_dpo",
                   "DPO / IPO / hinge / cDPO / SimPO on preference pairs (reference log-probs precomputed once)"),
    "ppo": Command("lmforge.posttrain.ppo", "PpoConfig", "run_ppo",
                   "PPO RLHF: value head, per-token KL penalty, GAE, clipped losses"),
    "grpo": Command("lmforge.posttrain.grpo", "GrpoConfig", "run_grpo",
                    "GRPO with verifiable task rewards (group-relative advantages, clipped objective)"),
    "reasoning data": Command("lmforge.tasks.reasoning", "ReasoningDataConfig", "write_reasoning_data",
                              "write multi-step arithmetic problems solved in <think> steps (chat JSONL for sft)"),
    "prm": Command("lmforge.posttrain.prm", "PrmConfig", "run_prm",
                   "process reward model on Math-Shepherd rollout step labels; step accuracy vs true labels"),
    "search": Command("lmforge.posttrain.search", "SearchConfig", "run_search",
                      "test-time search (vote, best-of-N, step beam, MCTS): accuracy and tokens per method"),
    "merge-adapter": Command("lmforge.peft.merge", "MergeAdapterConfig", "merge_adapter_cmd",
                             "fold a LoRA/DoRA adapter into its base model: one plain model directory", recipe=False),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lmforge <command> [RECIPE] [--section.key VALUE ...]", "",
             "Every option is a dotted config key; `lmforge <command> --help` lists them with defaults.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines)


def _find_command(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    for n in (2, 1):
        name = " ".join(argv[:n])
        if len(argv) >= n and name in COMMANDS:
            return name, list(argv[n:])
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lmforge import __version__

        print(__version__)
        return 0
    found = _find_command(argv)
    if found is None:
        groups = sorted({n.split()[0] for n in COMMANDS if " " in n})
        if argv[0] in groups:
            subs = [n for n in COMMANDS if n.startswith(argv[0] + " ")]
            print(f"lmforge: error: '{argv[0]}' needs a subcommand: {', '.join(subs)}", file=sys.stderr)
            return 2
        import difflib

        close = difflib.get_close_matches(argv[0], [n.split()[0] for n in COMMANDS], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"lmforge: error: unknown command '{argv[0]}'{hint}; run 'lmforge --help'", file=sys.stderr)
        return 2
    name, rest = found
    cmd = COMMANDS[name]
    try:
        module = importlib.import_module(cmd.module)
        cfg, print_only = parse_config(getattr(module, cmd.config), rest, prog=f"lmforge {name}",
                                       description=cmd.summary, recipe=cmd.recipe)
        if print_only:
            import json

            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        result = getattr(module, cmd.function)(cfg)
        return result if isinstance(result, int) else 0
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the OS refused a file (a full disk, permissions, a path through a file): one line
        print(f"lmforge: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
