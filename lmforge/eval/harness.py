"""Run tasks against a model: batched log-likelihoods and batched greedy generation.

Log-likelihood requests are (context, continuation) token lists. They are sorted by length,
right-padded and scored one forward per batch: with a causal model, padding after a sequence
cannot change the logits at its real positions, so no mask is needed (a prefix LM reads the context
as its prefix, an encoder-decoder as its masked source). Greedy generation goes
through `lmforge.generate.engine.generate`, which decodes a list of prompts as one batch (left padding,
masked).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json
from lmforge.eval.tasks import (
    Example,
    Task,
    chat_messages,
    extract_prediction,
    generate_metrics,
    load_task,
    multiple_choice_metrics,
)
from lmforge.generate.engine import Strategy, generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model.encdec import EncoderDecoder
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import prompt_ids, stop_token_ids


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def loglikelihoods(model: nn.Module, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                   progress: bool = False) -> list[tuple[float, bool]]:
    """For each (context, continuation): (sum of log p(continuation | context), whether it is greedy).

    Contexts longer than the model allows are cut from the left (as lm-evaluation-harness does);
    a continuation must fit with at least one context token. A prefix LM reads the context as its
    bidirectional prefix; an encoder-decoder reads it as the source and scores the continuation as the
    decoder's target (each as `lmforge.generate.engine` decodes them).
    """
    max_len = model.cfg.max_seq_len
    encdec = isinstance(model, EncoderDecoder)
    prepared = []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise LmforgeError(f"log-likelihood request {i}: context and continuation must be non-empty")
        if len(cont) >= max_len + encdec:
            raise LmforgeError(f"log-likelihood request {i}: continuation of {len(cont)} tokens does not fit the "
                               f"model's max_seq_len={max_len}")
        if encdec:  # source, decoder inputs (start + cont[:-1]), targets
            prepared.append((ctx[-max_len:], [model.cfg.decoder_start_id] + cont[:-1], cont))
        else:
            full = (ctx + cont)[-(max_len + 1):]
            prepared.append(([], full[:-1], cont))  # inputs, targets
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][1]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(prepared)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="loglik", unit="batch", disable=not progress):
            idx = order[start:start + batch_size]
            logprobs = torch.log_softmax(_batch_logits(model, [prepared[i] for i in idx]).float(), dim=-1)
            for row, i in enumerate(idx):
                _, inputs, cont = prepared[i]
                span = logprobs[row, len(inputs) - len(cont):len(inputs)]  # positions that predict cont
                target = torch.tensor(cont, device=span.device)
                ll = span.gather(-1, target[:, None]).sum().item()
                results[i] = (ll, bool((span.argmax(-1) == target).all()))
    finally:
        model.train(was_training)
    return results


def _right_pad(rows: Sequence[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L] and their mask (1 = token)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def _batch_logits(model: nn.Module, batch: Sequence[tuple[list[int], list[int], list[int]]]) -> torch.Tensor:
    """Logits [B, T, V] of right-padded (source, inputs, targets) rows: padding after a row's inputs cannot
    change its logits (causal after the prompt); an encoder-decoder's padded source keys are masked."""
    device = model_device(model)
    inputs, _ = _right_pad([b[1] for b in batch], device)
    if isinstance(model, EncoderDecoder):
        src, src_mask = _right_pad([b[0] for b in batch], device)
        return model(src, inputs, src_mask)
    if model.cfg.prefix_lm:  # the context part of the inputs is the prefix
        prefix = torch.tensor([len(b[1]) - len(b[2]) + 1 for b in batch], device=device)
        return model(inputs, prefix_len=prefix)
    return model(inputs)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation as the model reads them together.

    Trailing spaces of the context move to the continuation, and the continuation's ids are the tail
    of encode(context + continuation), so both sides tokenize as they would in running text
    (lm-evaluation-harness `_encode_pair`).
    """
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    if whole[:len(ctx)] != ctx:  # a merge across the boundary: fall back to separate encodings
        return ctx, tokenizer.encode(continuation)
    return ctx, whole[len(ctx):]


def prefix_ids(tokenizer: Tokenizer) -> list[int]:
    """Plain prompts start as a document does in the pretraining shards (`Tokenizer.sequence_start`: eos, or the
    tokenizer's declared bos), as generate and serve start them."""
    return tokenizer.sequence_start


def generation_prompt(task: Task, tokenizer: Tokenizer, ex: Example) -> list[int]:
    """Chat tasks: exactly the tokens SFT puts before a response (`chat.prompt_ids`); plain
    tasks: the sequence start + the prompt."""
    if task.spec.chat:
        return prompt_ids(tokenizer, chat_messages(ex))
    return prefix_ids(tokenizer) + tokenizer.encode(ex.prompt)


def stop_ids(task: Task, tokenizer: Tokenizer) -> list[int]:
    if task.spec.chat:
        return stop_token_ids(tokenizer)
    return [] if tokenizer.eos_id is None else [tokenizer.eos_id]


def choice_request(task: Task, tokenizer: Tokenizer, ex: Example, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) scoring `choice` as the answer to `ex`."""
    if task.spec.chat:  # the choice is the start of the assistant's reply
        return generation_prompt(task, tokenizer, ex), tokenizer.encode(choice)
    ctx, cont = encode_pair(tokenizer, ex.prompt, task.spec.target_delimiter + choice)
    return prefix_ids(tokenizer) + ctx, cont


def evaluate_task(model: nn.Module, tokenizer: Tokenizer, task: Task, batch_size: int = 16,
                  progress: bool = False) -> dict[str, Any]:
    """Score every example of `task`; returns {"name", "type", "n", metrics..., "examples": [...]}."""
    start = time.perf_counter()
    spec = task.spec
    records = []
    if spec.type == "multiple_choice":
        requests = []
        for ex in task.examples:
            for choice in ex.choices:
                requests.append(choice_request(task, tokenizer, ex, choice))
        scores = loglikelihoods(model, requests, batch_size, progress)
        at = 0
        for ex in task.examples:
            lls = [s[0] for s in scores[at:at + len(ex.choices)]]
            at += len(ex.choices)
            metrics = multiple_choice_metrics(lls, ex.choices, ex.gold)
            records.append({"index": ex.index, "gold": ex.gold, "logliks": [round(x, 4) for x in lls], **metrics})
    else:
        params = SamplingParams(greedy=True, max_new_tokens=spec.max_new_tokens,
                                stop_token_ids=stop_ids(task, tokenizer))
        prompts = [generation_prompt(task, tokenizer, ex) for ex in task.examples]
        for s in tqdm(range(0, len(prompts), batch_size), desc=f"generate {task.name}", unit="batch",
                      disable=not progress):
            outs = generate(model, prompts[s:s + batch_size], Strategy(sampling=params))
            for ex, ids in zip(task.examples[s:s + batch_size], outs):
                output = tokenizer.decode(ids)
                pred = extract_prediction(output, spec)
                records.append({"index": ex.index, "output": output, "prediction": pred, "answers": ex.answers,
                                **generate_metrics(pred, ex.answers)})
    metric_names = ["acc", "acc_norm"] if spec.type == "multiple_choice" else ["exact_match", "f1"]
    n = len(records)
    summary: dict[str, Any] = {"name": task.name, "type": spec.type, "path": str(task.path), "n": n}
    for m in metric_names:
        mean = sum(r[m] for r in records) / n
        summary[m] = mean
        summary[f"{m}_stderr"] = math.sqrt(mean * (1 - mean) / (n - 1)) if n > 1 else 0.0  # binomial stderr
    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["examples"] = records
    return summary


def find_task_files(paths: Sequence[str | Path]) -> list[Path]:
    """Task YAML files: given files, and every *.yaml / *.yml in given directories (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml"))
        elif p.is_file():
            files.append(p)
        else:
            raise LmforgeError(f"task not found: {p}")
    if not files:
        raise LmforgeError(f"no task files (*.yaml) in {', '.join(map(str, paths))}")
    return files


def run_tasks(model: nn.Module, tokenizer: Tokenizer, paths: Sequence[str | Path], batch_size: int = 16,
              limit: int = 0, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Load and score every task found under `paths`; returns {task name: summary}."""

    results = {}
    for file in find_task_files(paths):
        task = load_task(file, limit=limit)
        results[task.name] = evaluate_task(model, tokenizer, task, batch_size, progress)
    return results


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: task | n | metric | value ± stderr."""
    lines = ["| task | n | metric | value |", "|---|---|---|---|"]
    for name, r in results.items():
        for m in ("acc", "acc_norm", "exact_match", "f1"):
            if m in r:
                lines.append(f"| {name} | {r['n']} | {m} | {r[m]:.4f} ± {r[m + '_stderr']:.4f} |")
    return "\n".join(lines)


def strip_examples(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {m: v for m, v in r.items() if m != "examples"} for k, r in results.items()}


def save_results(path: str | Path, record: dict[str, Any]) -> Path:

    atomic_write_json(path, record)
    return Path(path)
