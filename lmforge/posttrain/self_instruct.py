"""`lmforge self-instruct`: the Self-Instruct / Alpaca recipe for bootstrapping instruction data.

Wang et al. 2023 ("Self-Instruct", sec. 2.2) and Taori et al. 2023 (Alpaca): each request shows the
model 8 tasks (6 sampled from the human seed tasks, 2 from the machine-generated ones so far) as a
numbered list "Task 1: ... Task 8:" and lets it continue with new tasks. A new instruction is kept
only if it passes the keyword rules (no image/graph/picture/file/map/draw/plot/go to, not too short or
long, no leading punctuation, ASCII only, not "Write a program") and its ROUGE-L F1 against every
instruction kept so far (seeds included) is below 0.7, so the pool grows in diversity. The model then
writes an input and an output for each kept instruction (few-shot, from seed examples), and the result
is written as Alpaca JSON. Output quality is the model's; the pipeline and filters are what lmforge
provides, and every rejection is written with its reason.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.core.config import option, require
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json, atomic_write_text
from lmforge.data.formats import iter_records
from lmforge.data.readers import BadRecord
from lmforge.generate.batch import generate_batch
from lmforge.generate.remote import ApiConfig, RemoteClient, choice_text, sampling_body
from lmforge.generate.sampling import SamplingParams
from lmforge.posttrain.models import load_policy
from lmforge.posttrain.stage import RunConfig, open_run, run_dir_option

# ----------------------------------------------------------------------------------------------
# ROUGE-L (Lin 2004): F-measure of the longest common subsequence of word tokens


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric words, as rouge_score's default tokenizer (no stemming) makes them."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_lengths(candidate: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
    """LCS length of `candidate` with each reference, one dynamic program vectorized over the references:
    dp[n, j] = LCS(candidate[:i], ref_n[:j]) is updated for all n at once, column by column."""
    n = len(references)
    width = max((len(r) for r in references), default=0)
    if n == 0 or width == 0 or not candidate:
        return np.zeros(n, dtype=np.int64)
    vocab = {w: k for k, w in enumerate(dict.fromkeys([*candidate, *(w for r in references for w in r)]))}
    refs = np.full((n, width), -1, dtype=np.int64)
    for row, ref in enumerate(references):
        refs[row, :len(ref)] = [vocab[w] for w in ref]
    prev = np.zeros((n, width + 1), dtype=np.int64)
    for word in candidate:
        match = refs == vocab[word]
        cur = np.zeros_like(prev)
        for j in range(1, width + 1):
            cur[:, j] = np.where(match[:, j - 1], prev[:, j - 1] + 1, np.maximum(prev[:, j], cur[:, j - 1]))
        prev = cur
    lengths = np.array([len(r) for r in references])
    return prev[np.arange(n), lengths]


def rouge_l(candidate: str, references: Sequence[str]) -> np.ndarray:
    """ROUGE-L F1 of `candidate` against each reference: 2PR/(P+R), P = LCS/|cand|, R = LCS/|ref|."""
    cand = rouge_tokens(candidate)
    refs = [rouge_tokens(r) for r in references]
    lcs = lcs_lengths(cand, refs).astype(np.float64)
    ref_len = np.array([len(r) for r in refs], dtype=np.float64)
    denom = len(cand) + ref_len
    return np.divide(2 * lcs, denom, out=np.zeros_like(lcs), where=denom > 0)  # 2PR/(P+R) = 2 LCS/(|c|+|r|)


# ----------------------------------------------------------------------------------------------
# keyword rules

BLOCKED_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                 "draw", "plot", "go to", "video", "audio", "flowchart", "diagram")
_BLOCKED = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLOCKED_WORDS) + r")\b", re.IGNORECASE)


def keyword_reject(instruction: str, min_words: int = 3, max_words: int = 150) -> str | None:
    """Why the Self-Instruct/Alpaca rules drop `instruction` ("category: detail"), or None when it passes.

    Language models cannot act on images, files or the outside world, so such tasks are dropped
    (Wang et al. 2023, sec. 2.2, "Filtering"), as are fragments and run-ons.
    """
    words = instruction.split()
    if len(words) < min_words:
        return f"too short: {len(words)} words < {min_words}"
    if len(words) > max_words:
        return f"too long: {len(words)} words > {max_words}"
    found = _BLOCKED.search(instruction)
    if found:
        return f"blocked keyword: {found.group(1).lower()}"
    if instruction.lower().startswith("write a program"):
        return "starts with: write a program"
    if not instruction[0].isalnum():
        return "starts with punctuation"
    if not instruction.isascii():
        return "non-ASCII characters"
    return None


# ----------------------------------------------------------------------------------------------
# prompts and parsing


@dataclass
class Task:
    instruction: str
    input: str = ""
    output: str = ""


def read_seed_tasks(path: str | Path) -> list[Task]:
    """Self-Instruct seed tasks (instruction + instances[0]) or Alpaca records (instruction/input/output)."""
    tasks = []
    for source, record in iter_records(path):
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise BadRecord(source, "missing field 'instruction'")
        instance = (record.get("instances") or [record])[0]
        if not isinstance(instance, dict):
            raise BadRecord(source, "field 'instances[0]' must be an object")
        tasks.append(Task(instruction.strip(), str(instance.get("input") or ""), str(instance.get("output") or "")))
    if not tasks:
        raise LmforgeError(f"{path}: no seed tasks")
    return tasks


def instruction_prompt(tasks: Sequence[Task]) -> str:
    """The Self-Instruct request: the sampled tasks as a numbered list, ending where the next one begins."""
    lines = ["Come up with a series of tasks:", ""]
    lines += [f"Task {i}: {t.instruction}" for i, t in enumerate(tasks, 1)]
    return "\n".join(lines) + f"\nTask {len(tasks) + 1}:"


_TASK_MARK = re.compile(r"\n?\s*Task\s*\d+\s*:")


def parse_instructions(completion: str) -> list[str]:
    """New instructions in a continuation of `instruction_prompt`: one per "Task N:" item, first line each."""
    out = []
    for piece in _TASK_MARK.split(completion):
        line = next((ln.strip() for ln in piece.splitlines() if ln.strip()), "")
        if line:
            out.append(line)
    return out


def instance_prompt(examples: Sequence[Task], instruction: str) -> str:
    """Few-shot request for an input and output of `instruction` (Alpaca generates them with the task)."""
    shots = [f"Instruction: {t.instruction}\nInput: {t.input or '<noinput>'}\nOutput: {t.output}\n" for t in examples]
    return "\n".join([*shots, f"Instruction: {instruction}\nInput:"])


def parse_instance(completion: str) -> tuple[str, str] | None:
    """(input, output) from "<input>\\nOutput: <output>"; None when there is no output."""
    if "Output:" not in completion:
        return None
    given, output = completion.split("Output:", 1)
    output = re.split(r"\n\s*\n|\nInstruction:", output, maxsplit=1)[0].strip()
    given = given.strip()
    if not output:
        return None
    return ("" if given in ("<noinput>", "") else given), output


# ----------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class SelfInstructConfig(RunConfig):
    run_dir: str = run_dir_option("runs/self-instruct", "config.json, instructions.json (Alpaca), rejected.jsonl, "
                                                        "stats.json")
    seed_tasks: str = option("", "seed tasks: Self-Instruct JSONL (instruction, instances) or Alpaca records")
    num_instructions: int = option(100, "stop once this many new instructions are kept")
    requests_per_round: int = option(8, "requests sampled together per round")
    max_rounds: int = option(50, "stop after this many rounds even if fewer instructions were kept")
    num_human: int = option(6, "seed tasks shown per request")
    num_machine: int = option(2, "machine-generated tasks shown per request (seeds fill in until there are some)")
    num_shots: int = option(3, "seed examples shown when asking for an instruction's input and output")
    rouge_threshold: float = option(0.7, "keep an instruction only if its ROUGE-L F1 to every kept one is below this")
    min_words: int = option(3, "shorter instructions are dropped")
    max_words: int = option(150, "longer instructions are dropped")
    sampling: SamplingParams = option(default_factory=lambda: SamplingParams(max_new_tokens=96, seed=0),
                                      help="sampling for instructions and instances")
    seed: int = option(0, "seed of the seed-task sampling")
    device: str = option("auto", "cpu, cuda, or auto")
    teacher_url: str = option("", "generate with an OpenAI-compatible endpoint instead of --checkpoint (Alpaca's "
                                  "text-davinci-003 route), e.g. http://localhost:8000/v1")
    teacher_endpoint: Literal["completions", "chat"] = option(
        "completions", "completions sends each prompt as text to continue (a base model, as Self-Instruct "
                       "prompts it); chat sends it as one user message (for chat-only APIs)")
    api: ApiConfig = option(default_factory=ApiConfig, help="the teacher endpoint: model, key, retries, rate "
                                                            "limit, cache")

    def __post_init__(self) -> None:
        for name in ("num_instructions", "requests_per_round", "max_rounds", "num_human"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(0 < self.rouge_threshold <= 1, "rouge_threshold", self.rouge_threshold, "in (0, 1]")


Generate = Callable[[list[str]], list[str]]


@dataclass
class SelfInstructResult:
    kept: list[Task]
    rejected: list[dict[str, str]]  # {"instruction", "reason"}
    rounds: int
    counts: Counter = field(default_factory=Counter)


def self_instruct(cfg: SelfInstructConfig, seeds: Sequence[Task], generate: Generate) -> SelfInstructResult:
    """The loop, given any text generator (prompts -> continuations): a model, or a scripted fake in tests."""
    rng = random.Random(cfg.seed)
    pool = [t.instruction for t in seeds]  # everything new instructions are compared against
    kept: list[Task] = []
    rejected: list[dict[str, str]] = []
    counts: Counter = Counter()
    rounds = 0
    while len(kept) < cfg.num_instructions and rounds < cfg.max_rounds:
        rounds += 1
        requests = []
        for _ in range(cfg.requests_per_round):
            machine = rng.sample(kept, min(cfg.num_machine, len(kept)))
            human = rng.sample(list(seeds), min(cfg.num_human + cfg.num_machine - len(machine), len(seeds)))
            shown = human + machine
            rng.shuffle(shown)
            requests.append(instruction_prompt(shown))
        fresh: list[str] = []
        for completion in generate(requests):
            for instruction in parse_instructions(completion):
                counts["generated"] += 1
                reason = keyword_reject(instruction, cfg.min_words, cfg.max_words)
                if reason is None:
                    scores = rouge_l(instruction, pool)
                    best = int(scores.argmax()) if len(scores) else -1
                    if best >= 0 and scores[best] >= cfg.rouge_threshold:
                        reason = f"ROUGE-L: {scores[best]:.2f} >= {cfg.rouge_threshold} with {pool[best][:80]!r}"
                if reason is None:
                    pool.append(instruction)
                    fresh.append(instruction)
                else:
                    counts[reason.split(":")[0]] += 1
                    rejected.append({"instruction": instruction, "reason": reason})
        fresh = fresh[:cfg.num_instructions - len(kept)]
        shots = [rng.sample(list(seeds), min(cfg.num_shots, len(seeds))) for _ in fresh]
        for instruction, completion in zip(fresh, generate([instance_prompt(s, i) for s, i in zip(shots, fresh)])):
            instance = parse_instance(completion)
            if instance is None:
                counts["no output"] += 1
                rejected.append({"instruction": instruction, "reason": "no output generated"})
                continue
            kept.append(Task(instruction, *instance))
    counts["kept"] = len(kept)
    return SelfInstructResult(kept, rejected, rounds, counts)


def model_generator(checkpoint: str, sampling: SamplingParams, device: str = "auto") -> Generate:
    """Plain-text continuation with a checkpoint (no chat template: Self-Instruct prompts a base LM)."""

    model, tokenizer = load_policy(checkpoint, device)
    stops = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    calls = [0]

    def generate(prompts: list[str]) -> list[str]:
        if not prompts:
            return []
        ids = [tokenizer.sequence_start + tokenizer.encode(p) for p in prompts]
        seed = None if sampling.seed is None else sampling.seed + calls[0]
        calls[0] += 1
        params = dataclasses.replace(sampling, stop_token_ids=sampling.stop_token_ids or stops)
        return [tokenizer.decode(r) for r in generate_batch(model, ids, params, seed=seed)]

    return generate


def api_generator(client: RemoteClient, sampling: SamplingParams,
                  endpoint: Literal["completions", "chat"] = "completions") -> Generate:
    """Continuations from an OpenAI-compatible endpoint. Request i of call c carries seed sampling.seed + c * 100003
    + i, so every request differs, a rerun sends the same requests (and finds them in the cache)."""

    calls = [0]
    temperature = 0.0 if sampling.is_greedy else sampling.temperature

    def generate(prompts: list[str]) -> list[str]:
        bodies = []
        for i, text in enumerate(prompts):
            seed = None if sampling.seed is None else sampling.seed + calls[0] * 100_003 + i
            body = sampling_body(temperature, sampling.top_p, sampling.max_new_tokens, seed)
            if endpoint == "completions":
                body["prompt"] = text
            else:
                body["messages"] = [{"role": "user", "content": text}]
            bodies.append(body)
        calls[0] += 1
        path = "/completions" if endpoint == "completions" else "/chat/completions"
        return [choice_text(r, endpoint) for r in client.map(path, bodies)]

    return generate


def run_self_instruct(cfg: SelfInstructConfig) -> dict[str, Any]:
    """Generate, filter and write RUN/instructions.json (Alpaca: instruction, input, output)."""
    if not cfg.seed_tasks:
        raise LmforgeError("self-instruct: give --seed_tasks FILE (e.g. self_instruct_seed_tasks.jsonl)")
    if bool(cfg.checkpoint) == bool(cfg.teacher_url):
        raise LmforgeError("self-instruct: give exactly one teacher: --checkpoint DIR (a local model) or "
                           "--teacher-url URL (an OpenAI-compatible endpoint)")
    seeds = read_seed_tasks(cfg.seed_tasks)
    client = RemoteClient(cfg.teacher_url, cfg.api) if cfg.teacher_url else None
    if client is not None:
        generate = api_generator(client, cfg.sampling, cfg.teacher_endpoint)
    else:
        generate = model_generator(cfg.checkpoint, cfg.sampling, cfg.device)
    run_dir = open_run(cfg)
    try:
        result = self_instruct(cfg, seeds, generate)
    finally:
        if client is not None:
            client.close()
    out_path = run_dir / "instructions.json"
    atomic_write_json(out_path, [dataclasses.asdict(t) for t in result.kept])
    atomic_write_text(run_dir / "rejected.jsonl", "".join(json.dumps(r) + "\n" for r in result.rejected))
    stats = {"seed_tasks": len(seeds), "rounds": result.rounds, **dict(result.counts),
             "instructions": str(out_path)}
    if client is not None:
        stats["api"] = dict(client.stats)
    atomic_write_json(run_dir / "stats.json", stats)
    print(f"self-instruct: {result.counts['generated']} generated, {len(result.kept)} kept after {result.rounds} "
          f"rounds -> {out_path}", file=sys.stderr)
    return stats
