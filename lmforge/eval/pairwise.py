"""Judged comparisons: pairwise win rate of two checkpoints, and reward-model accuracy on held-out pairs.

Win rate (as in AlpacaEval / the RLHF papers' head-to-head evaluations): both models answer the
same held-out prompts; a judge prefers one answer or calls a tie; win_rate = (wins + ties / 2) / n.
The prompts are held-out synthetic-suite prompts or the user's prompt file (`--prompts`, with reference
answers). The judge is a verifier (an answer is right or wrong: exact, numeric or math equivalence
against the reference), a trained reward model (`lmforge reward`: the higher reward wins), or an LLM behind
an OpenAI-compatible endpoint (`--judge api --judge-url URL`, `lmforge.eval.judge`: both orders, ties counted).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json
from lmforge.core.runtime import resolve_device
from lmforge.data.formats import read_preference_pairs
from lmforge.data.readers import BadRecord
from lmforge.eval.judge import judge_pairs
from lmforge.generate.engine import Strategy, generate
from lmforge.generate.remote import ApiConfig, RemoteClient
from lmforge.generate.sampling import SamplingParams
from lmforge.peft.config import load_trained
from lmforge.posttrain.models import pad_id_of
from lmforge.posttrain.pairs import encode_pairs, synthetic_pairs
from lmforge.posttrain.reward import evaluate_pairs, load_reward_model, score_texts
from lmforge.tasks.prompts import PromptExample, read_prompts, task_prompts
from lmforge.tasks.suite import make_examples
from lmforge.tasks.verifiers import ANSWER_VERIFIERS
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import prompt_ids, stop_token_ids


def answers(model: nn.Module, tokenizer: Tokenizer, prompts: list[list[dict[str, str]]], max_new_tokens: int = 32,
            batch_size: int = 16) -> list[str]:
    """Greedy chat answers, batched, each prompt encoded exactly as SFT encodes it."""

    params = SamplingParams(greedy=True, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids(tokenizer))
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    out = []
    for i in range(0, len(ids), batch_size):
        out += [tokenizer.decode(x) for x in generate(model, ids[i:i + batch_size], Strategy(sampling=params))]
    return out


def tally(scores_a: list[float], scores_b: list[float]) -> dict[str, Any]:
    """wins / ties / losses of A against B, and A's win rate counting a tie as half a win."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("need the same, non-zero number of scores on both sides")
    wins = sum(a > b for a, b in zip(scores_a, scores_b))
    ties = sum(a == b for a, b in zip(scores_a, scores_b))
    n = len(scores_a)
    return {"n": n, "wins": wins, "ties": ties, "losses": n - wins - ties, "win_rate": (wins + ties / 2) / n}


def win_rate(model_a: nn.Module, model_b: nn.Module, tokenizer: Tokenizer, n: int = 100, seed: int = 1,
             judge: Literal["verifier", "reward", "api"] = "verifier", reward_model: nn.Module | None = None,
             max_new_tokens: int = 32, examples: list[PromptExample] | None = None,
             verifier: str = "exact", judge_client: RemoteClient | None = None) -> dict[str, Any]:
    """A's win rate over B on `examples` (prompts with reference answers, e.g. `read_prompts`), else on `n`
    held-out synthetic-suite prompts (odd `seed`: never seen in training). The verifier judge scores each answer
    with `verifier` (exact, numeric or math) against the reference; the reward judge with `reward_model`; the api
    judge asks the LLM behind `judge_client` (no reference needed)."""

    examples = examples if examples is not None else task_prompts(make_examples(n, seed))
    n = len(examples)
    prompts = [e.messages for e in examples]
    if judge == "verifier":
        verify = ANSWER_VERIFIERS[verifier]
        for e in examples:
            if not e.answer:
                raise BadRecord(e.source, "the verifier judge needs a reference answer (field 'answer', or a last "
                                          "assistant turn)")
    elif judge == "reward" and reward_model is None:
        raise LmforgeError("judge 'reward' needs a reward model (--reward-model DIR from `lmforge reward`)")
    elif judge == "api" and judge_client is None:
        raise LmforgeError("judge 'api' needs an endpoint (--judge-url URL of an OpenAI-compatible server)")
    out_a = answers(model_a, tokenizer, prompts, max_new_tokens)
    out_b = answers(model_b, tokenizer, prompts, max_new_tokens)
    judged: dict[str, Any] = {}
    if judge == "verifier":
        sa = [verify(c, e.answer) for e, c in zip(examples, out_a)]
        sb = [verify(c, e.answer) for e, c in zip(examples, out_b)]
    elif judge == "reward":
        sa = score_texts(reward_model, tokenizer, prompts, out_a)
        sb = score_texts(reward_model, tokenizer, prompts, out_b)
    else:
        judged = judge_pairs(judge_client, [e.prompt for e in examples], out_a, out_b)
        sa = judged["scores"]
        sb = [1.0 - s for s in sa]
    result = tally(sa, sb)
    if judged:
        result.update(judge_invalid=judged["invalid"], position_consistency=judged["position_consistency"],
                      judge_api=dict(judge_client.stats))
    result.update(judge=judge, accuracy_a=None, accuracy_b=None,
                  examples=[{"prompt": e.prompt, "a": a, "b": b} for e, a, b in zip(examples[:20], out_a, out_b)])
    if judge == "verifier":
        result.update(accuracy_a=sum(sa) / n, accuracy_b=sum(sb) / n)
    return result


def reward_accuracy(reward_model: nn.Module, tokenizer: Tokenizer, data: str = "", format: str = "auto",
                    n: int = 200, seed: int = 1, max_len: int = 128) -> dict[str, float]:
    """Held-out preference accuracy of a reward model: on `data` (a preference file), else on `n`
    synthetic pairs from the held-out prompt half (odd seed)."""

    if data:
        pairs = read_preference_pairs(data, format)
    else:
        if seed % 2 == 0:
            raise LmforgeError(f"seed must be odd (the held-out prompt half), got {seed}")
        pairs = synthetic_pairs(n, seed)
    result = evaluate_pairs(reward_model, encode_pairs(tokenizer, pairs, max_len), pad_id_of(tokenizer))
    return {"n": len(pairs), "reward_accuracy": result["heldout_accuracy"], "margin": result["heldout_margin"]}


@dataclass
class WinRateConfig:
    checkpoint: str = option(help="model A (the candidate)")
    baseline: str = option(help="model B (the baseline), e.g. the SFT model when A is the DPO one")
    adapter: str = option("", "PEFT adapter on top of model A")
    baseline_adapter: str = option("", "PEFT adapter on top of model B")
    judge: Literal["verifier", "reward", "api"] = option(
        "verifier", "verifier: the reference answer decides; reward: a reward model's score; api: an LLM judge "
                    "behind --judge-url, asked in both orders")
    reward_model: str = option("", "reward model directory (`lmforge reward` output) for judge=reward")
    judge_url: str = option("", "judge=api: OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    api: ApiConfig = option(default_factory=ApiConfig, help="judge=api: model, key, retries, rate limit, cache")
    prompts: str = option("", "prompt file (JSONL/JSON, the formats of `lmforge grpo --prompts`): the first n prompts "
                              "and their reference answers; empty = held-out synthetic prompts")
    format: str = option("auto", "format of the prompt file (auto recognizes each record)")
    verifier: Literal["exact", "numeric", "math"] = option("exact", "how the verifier judge compares an answer with "
                                                                    "the reference")
    reward_data: str = option("", "with a reward model: preference file for its accuracy (empty: synthetic)")
    n: int = option(100, "held-out prompts (and pairs, for reward accuracy)")
    seed: int = option(1, "odd seed: the held-out half of the synthetic prompts")
    max_new_tokens: int = option(32, "most tokens per answer")
    output: str = option("", "write the result JSON here")
    device: str = option("auto", "auto, cpu, cuda, ...")


def win_rate_cmd(cfg: WinRateConfig) -> int:
    import json

    device = str(resolve_device(cfg.device))
    model_a = load_trained(cfg.checkpoint, cfg.adapter or None, device=device)
    model_b = load_trained(cfg.baseline, cfg.baseline_adapter or None, device=device)
    tokenizer = Tokenizer.load(cfg.checkpoint)
    rm = None
    if cfg.reward_model:
        rm = load_reward_model(cfg.reward_model, device)
    examples = read_prompts(cfg.prompts, cfg.format)[:cfg.n] if cfg.prompts else None
    if cfg.judge_url and cfg.judge != "api":
        raise LmforgeError(f"--judge-url is only used with --judge api (got --judge {cfg.judge})")
    client = RemoteClient(cfg.judge_url, cfg.api) if cfg.judge == "api" and cfg.judge_url else None
    try:
        result = win_rate(model_a, model_b, tokenizer, cfg.n, cfg.seed, cfg.judge, rm, cfg.max_new_tokens,
                          examples, cfg.verifier, judge_client=client)
    finally:
        if client is not None:
            client.close()
    if rm is not None:
        result["reward_model"] = reward_accuracy(rm, tokenizer, cfg.reward_data, n=cfg.n, seed=cfg.seed)
    print(f"A {cfg.checkpoint} vs B {cfg.baseline}, judged by {cfg.judge} on {result['n']} held-out prompts: "
          f"win rate {result['win_rate']:.3f} ({result['wins']} wins, {result['ties']} ties, "
          f"{result['losses']} losses)")
    if "judge_invalid" in result:
        print(f"LLM judge: {result['judge_invalid']} unusable replies (scored as ties), the two orders agreed on "
              f"{result['position_consistency']:.0%} of prompts")
    if result["accuracy_a"] is not None:
        print(f"exact-answer accuracy: A {result['accuracy_a']:.3f}, B {result['accuracy_b']:.3f}")
    if rm is not None:
        print(f"reward model accuracy on {result['reward_model']['n']} held-out pairs: "
              f"{result['reward_model']['reward_accuracy']:.3f}")
    if cfg.output:
        record = dict(result)
        record["tasks"] = {"winrate": {"n": result["n"], "win_rate": result["win_rate"]}}
        if rm is not None:
            record["tasks"]["reward_model"] = {"n": result["reward_model"]["n"],
                                               "reward_accuracy": result["reward_model"]["reward_accuracy"]}
        atomic_write_json(cfg.output, {**record, "config": dataclasses.asdict(cfg)})
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}))
    return 0


@dataclass
class RewardAccuracyConfig:
    reward_model: str = option(help="reward model directory (`lmforge reward` output, with its tokenizer)")
    data: str = option("", "preference file (HH-RLHF, SHP, PKU, Stack Exchange or plain chosen/rejected JSONL); "
                           "empty: synthetic pairs from the held-out prompt half")
    format: str = option("auto", "layout of --data (see `lmforge dpo --help`); auto detects it")
    n: int = option(200, "synthetic pairs when no --data is given")
    seed: int = option(1, "odd seed: the held-out half of the synthetic prompts")
    max_len: int = option(128, "tokens per encoded pair (longer ones are cut)")
    output: str = option("", "write the result JSON here")
    device: str = option("auto", "auto, cpu, cuda, ...")


def reward_accuracy_cmd(cfg: RewardAccuracyConfig) -> int:
    """`lmforge eval reward-accuracy`: how often the reward model scores chosen above rejected."""
    import json

    rm = load_reward_model(cfg.reward_model, str(resolve_device(cfg.device)))
    result = reward_accuracy(rm, Tokenizer.load(cfg.reward_model), cfg.data, cfg.format, cfg.n, cfg.seed,
                             cfg.max_len)
    source = cfg.data or f"{cfg.n} synthetic held-out pairs"
    print(f"reward model {cfg.reward_model} on {source}: accuracy {result['reward_accuracy']:.3f}, "
          f"mean margin {result['margin']:.3f} ({result['n']} pairs)")
    if cfg.output:
        atomic_write_json(cfg.output, {**result, "tasks": {"reward_model": {
            "n": result["n"], "reward_accuracy": result["reward_accuracy"]}}, "config": dataclasses.asdict(cfg)})
    print(json.dumps(result))
    return 0
