"""Search at test time: spend more generated tokens on a problem to answer it better.

Every method samples from the policy through one `Sampler` (which counts the tokens it generates) and
returns a `SearchResult`: the answer, the chosen completion, the trace (votes, beams, or the tree) and the
tokens spent. A reasoning step is a line of the response (`tasks.reasoning.split_steps`).

- `majority_vote`: N samples, the most frequent answer (self-consistency, Wang et al. 2023).
- `best_of_n`: N samples, the best by an outcome scorer (an ORM, or a PRM's step scores aggregated by
  min / product / last step, Lightman et al. 2023).
- `step_beam_search`: each round extends every open beam by `expansions` sampled next steps and keeps the
  `beam_width` best partial solutions by the PRM (Snell et al. 2024).
- `mcts`: Monte Carlo tree search over steps: select by UCT or PUCT (the prior of a step is how often the
  policy sampled it), expand `expansions` next steps, evaluate each by the PRM or by a rollout to the end
  scored by an outcome scorer, back the value up; the answer is the best-valued finished response the tree found.

Scorers map response texts to numbers: a `StepScorer` gives one score per step (a PRM, or the oracle
`tasks.reasoning.step_labels` in tests), an `OutcomeScorer` one per response.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.core.config import option, require
from lmforge.core.files import atomic_write, atomic_write_json, atomic_write_text
from lmforge.data.formats import Message
from lmforge.generate.batch import generate_batch
from lmforge.generate.sampling import SamplingParams
from lmforge.posttrain.models import device_of, load_policy
from lmforge.posttrain.prm import load_prm, prm_scorer
from lmforge.posttrain.reward import load_reward_model, score_texts
from lmforge.posttrain.stage import RunConfig, open_run, run_dir_option
from lmforge.tasks.reasoning import Problem, StepRange, extract_answer, make_problems, split_steps, step_labels
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import prompt_ids, stop_token_ids

StepScorer = Callable[[list[str]], list[list[float]]]
OutcomeScorer = Callable[[list[str]], list[float]]
AGGREGATES = ("min", "prod", "last")


def aggregate(step_scores: list[float], how: str = "min") -> float:
    """One score for a solution from its step scores: the weakest step, the product, or the last step."""
    if not step_scores:
        return 0.0
    if how == "min":
        return min(step_scores)
    if how == "prod":
        return math.prod(step_scores)
    if how == "last":
        return step_scores[-1]
    raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {how!r}")


def outcome_of(step_scorer: StepScorer, how: str = "min") -> OutcomeScorer:
    """A step scorer as an outcome scorer (a PRM ranking whole solutions)."""
    return lambda texts: [aggregate(s, how) for s in step_scorer(texts)]


def oracle_step_scorer(problem: Problem) -> StepScorer:
    """The true step labels as a PRM: 1.0 for a good step, 0.0 from the first wrong one on."""
    return lambda texts: [[float(x) for x in step_labels(problem, t)] for t in texts]


def newline_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Every token whose text contains a newline: a step ends when one is sampled."""
    return [i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i], skip_special_tokens=False)]


class Sampler:
    """The policy on one prompt: samples whole responses or next steps after response prefixes, counting
    every generated token. Each call draws from its own seed (seed, seed + 1, ...), so a search is
    reproducible."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, prompt: list[Message],
                 params: SamplingParams | None = None, seed: int = 0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.params = params or SamplingParams(temperature=1.0, max_new_tokens=64)
        self.base = prompt_ids(tokenizer, prompt)
        self.ends = set(stop_token_ids(tokenizer))
        self.newlines = set(newline_token_ids(tokenizer))
        self.seed, self.calls, self.tokens = seed, 0, 0

    def sample(self, prefixes: list[str], n: int, one_step: bool = False,
               max_new_tokens: int | None = None) -> list[tuple[str, bool]]:
        """`n` continuations of each prefix (prefix-major) as (text with the prefix, finished). A step ends at a
        newline; a response is finished at the end of the turn, at its answer step, or out of budget."""
        if not prefixes:
            return []
        stops = self.ends | self.newlines if one_step else self.ends
        budget = max_new_tokens or self.params.max_new_tokens
        params = dataclasses.replace(self.params, stop_token_ids=sorted(stops), max_new_tokens=budget)
        rows = generate_batch(self.model, [self.base + self.tokenizer.encode(p) for p in prefixes], params, n,
                              seed=self.seed + self.calls, keep_stop=True)
        self.calls += 1
        out = []
        for k, row in enumerate(rows):
            self.tokens += len(row)
            text = prefixes[k // n] + self.tokenizer.decode([t for t in row if t not in self.ends])
            steps = split_steps(text)
            done = (not one_step or not row or row[-1] in self.ends or len(row) >= budget
                    or bool(steps and steps[-1].is_answer))
            out.append((text, done))
        return out


@dataclass
class SearchResult:
    answer: str | None
    best: str  # the chosen response
    score: float
    tokens: int  # tokens the policy generated for this search
    candidates: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    trace: dict[str, Any] = field(default_factory=dict)  # votes, beams per round, or the MCTS tree


def majority_vote(sampler: Sampler, n: int = 8) -> SearchResult:
    """Self-consistency: the most frequent answer of `n` samples (ties: the one sampled first)."""
    texts = [t for t, _ in sampler.sample([""], n)]
    answers = [extract_answer(t) for t in texts]
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return SearchResult(None, texts[0], 0.0, sampler.tokens, texts, [0.0] * n, {"votes": {}})
    top = max(votes.values())
    answer = next(a for a in answers if a is not None and votes[a] == top)
    best = texts[answers.index(answer)]
    return SearchResult(answer, best, top / n, sampler.tokens, texts, [float(votes.get(a, 0)) for a in answers],
                        {"votes": dict(votes)})


def best_of_n(sampler: Sampler, scorer: OutcomeScorer, n: int = 8) -> SearchResult:
    """`n` samples, the highest-scoring one (ties: the first sampled)."""
    texts = [t for t, _ in sampler.sample([""], n)]
    scores = scorer(texts)
    i = max(range(n), key=lambda k: scores[k])
    return SearchResult(extract_answer(texts[i]), texts[i], scores[i], sampler.tokens, texts, scores)


def step_beam_search(sampler: Sampler, scorer: StepScorer, beam_width: int = 2, expansions: int = 4,
                     max_steps: int = 8, how: str = "min") -> SearchResult:
    """Beam search whose unit is a reasoning step: every round samples `expansions` next steps of each open
    beam (one batch), scores every partial solution by `scorer` aggregated with `how`, and keeps the best
    `beam_width` (finished beams compete too). Stops when every beam is finished or after `max_steps`."""
    beams: list[tuple[str, bool, float]] = [("", False, 0.0)]
    rounds = []
    for step in range(max_steps):
        open_beams = [b for b in beams if not b[1]]
        if not open_beams:
            break
        cands = sampler.sample([b[0] for b in open_beams], expansions, one_step=True)
        cands = [(t, f or step + 1 == max_steps) for t, f in cands]
        scores = [aggregate(s, how) for s in scorer([t for t, _ in cands])]
        pool = [b for b in beams if b[1]] + [(t, f, s) for (t, f), s in zip(cands, scores)]
        beams = sorted(pool, key=lambda b: -b[2])[:beam_width]  # stable: ties keep the earlier candidate
        rounds.append([{"text": t, "finished": f, "score": s} for t, f, s in beams])
    best = beams[0]
    return SearchResult(extract_answer(best[0]), best[0], best[2], sampler.tokens, [b[0] for b in beams],
                        [b[2] for b in beams], {"rounds": rounds})


@dataclass
class Node:
    text: str  # the response so far
    finished: bool
    prior: float = 1.0
    visits: int = 0
    value_sum: float = 0.0
    children: list[Node] = field(default_factory=list)
    parent: Node | None = None

    @property
    def value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def tree(self) -> dict[str, Any]:
        step = self.text[len(self.parent.text):] if self.parent else self.text
        return {"step": step, "visits": self.visits, "value": round(self.value, 4), "prior": round(self.prior, 4),
                "finished": self.finished, "children": [c.tree() for c in self.children]}


def _select(node: Node, c: float, rule: str) -> Node:
    def ucb(ch: Node) -> float:
        if rule == "uct":
            return ch.value + c * math.sqrt(math.log(max(node.visits, 1)) / ch.visits)
        return ch.value + c * ch.prior * math.sqrt(node.visits) / (1 + ch.visits)
    return max(node.children, key=ucb)


def mcts(sampler: Sampler, scorer: StepScorer | None = None, simulations: int = 16, expansions: int = 4,
         c: float = 1.0, rule: str = "puct", rollout_scorer: OutcomeScorer | None = None, how: str = "min",
         max_depth: int = 8) -> SearchResult:
    """Monte Carlo tree search over reasoning steps.

    Each simulation descends by `rule` ("uct": Q + c sqrt(ln N / n); "puct": Q + c P sqrt(N) / (1 + n), P the
    step's share of the samples that proposed it) to a leaf, expands it with `expansions` sampled next steps
    (identical ones merge), and values each new child: with `rollout_scorer`, by completing it once and
    scoring the completion; otherwise by `scorer` on the prefix (aggregated with `how`). A finished leaf is
    valued again. Values are averaged up the path. The answer is the best-valued finished response found
    (a finished node or a rollout); without one, the most visited path is completed by one sample.
    """
    if rule not in ("uct", "puct"):
        raise ValueError(f"rule must be uct or puct, got {rule!r}")
    if scorer is None and rollout_scorer is None:
        raise ValueError("mcts needs a step scorer or a rollout scorer")
    root = Node("", False, visits=1)
    finals: list[tuple[str, float]] = []  # finished responses seen (nodes and rollouts) with their value

    def evaluate(texts: list[str], finished: list[bool]) -> list[float]:
        if rollout_scorer is None:
            return [aggregate(s, how) for s in scorer(texts)]
        todo = [t for t, f in zip(texts, finished) if not f]
        done_iter = iter(t for t, _ in sampler.sample(todo, 1))
        full = [t if f else next(done_iter) for t, f in zip(texts, finished)]
        values = rollout_scorer(full)
        finals.extend(zip(full, values))
        return values

    for _ in range(simulations):
        node, depth = root, 0
        while node.children and not node.finished:
            node, depth = _select(node, c, rule), depth + 1
        if node.finished or depth >= max_depth:
            new, values = [node], evaluate([node.text], [True])
        else:
            counts = Counter(sampler.sample([node.text], expansions, one_step=True))
            new = [Node(t, f, prior=k / expansions, parent=node) for (t, f), k in counts.items()]
            node.children = new
            values = evaluate([n.text for n in new], [n.finished for n in new])
        for leaf, v in zip(new, values):
            if leaf.finished:
                finals.append((leaf.text, v))
            n: Node | None = leaf
            while n is not None and n is not root:
                n.visits += 1
                n.value_sum += v
                n = n.parent
            root.visits += 1
            root.value_sum += v
    if finals:
        best, score = max(finals, key=lambda f: f[1])
    else:
        node = root
        while node.children:
            node = max(node.children, key=lambda ch: (ch.visits, ch.value))
        best, score = sampler.sample([node.text], 1)[0][0], node.value
    return SearchResult(extract_answer(best), best, score, sampler.tokens, [t for t, _ in finals],
                        [v for _, v in finals], {"tree": root.tree()})


# ----------------------------------------------------------------------------------------------
# `lmforge search`: every method on held-out problems, accuracy and tokens spent

METHODS = ("greedy", "vote", "best_of_n", "beam", "mcts")


@dataclass
class SearchSettings(StepRange):
    """Which search methods run on how many held-out reasoning problems, and their budgets (`lmforge search`, and
    `lmforge eval --reasoning true` under --search.*)."""

    prm: str = option("", "process reward model directory (`lmforge prm`): scores steps for best_of_n, beam, mcts")
    orm: str = option("", "outcome reward model directory (`lmforge reward`): scores best_of_n when no prm is given")
    oracle: bool = option(False, "score steps with the task's true step labels instead of a PRM (the upper bound "
                                 "of the search machinery)")
    methods: list[str] = option(default_factory=lambda: list(METHODS), help=f"any of {', '.join(METHODS)}")
    problems: int = option(32, "held-out problems")
    seed: int = option(0, "problems come from the held-out half drawn with seed 2*seed+1; sampling seeds follow")
    n: int = option(8, "samples of vote and best_of_n")
    aggregate: str = option("min", f"PRM step scores -> one solution score: {', '.join(AGGREGATES)}")
    beam_width: int = option(2, "beams kept by beam search")
    expansions: int = option(4, "next steps sampled per beam (beam) or per expanded node (mcts)")
    simulations: int = option(8, "MCTS simulations")
    rule: str = option("puct", "MCTS selection: uct or puct")
    c: float = option(1.0, "MCTS exploration constant")
    mcts_value: str = option("prm", "MCTS leaf value: prm (the PRM on the prefix) or rollout (complete once, score "
                                    "the completion)")
    temperature: float = option(1.0, "sampling temperature of every method but greedy")
    max_new_tokens: int = option(64, "token budget of one response (and of one step)")
    scales: list[int] = option(default_factory=lambda: [1], help="budget multipliers (of n, expansions, "
                                                                 "simulations): one point of the test-time compute "
                                                                 "curve each; several also draw RUN/curve.png")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.scales) and all(x >= 1 for x in self.scales), "scales", self.scales, "integers >= 1")
        bad = [m for m in self.methods if m not in METHODS]
        require(bool(self.methods) and not bad, "methods", self.methods, f"a non-empty list of {', '.join(METHODS)}")
        for name in ("problems", "n", "beam_width", "expansions", "simulations", "max_new_tokens"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(self.aggregate in AGGREGATES, "aggregate", self.aggregate, " or ".join(AGGREGATES))
        require(self.rule in ("uct", "puct"), "rule", self.rule, "uct or puct")
        require(self.mcts_value in ("prm", "rollout"), "mcts_value", self.mcts_value, "prm or rollout")
        require(self.temperature > 0, "temperature", self.temperature, "> 0")

    def step_scored(self) -> list[str]:
        """The methods of this search that score steps (with the PRM, or the oracle)."""
        return [m for m in self.methods if m in ("beam", "mcts") or (m == "best_of_n" and not self.orm)]

    def require_scorers(self, prefix: str = "") -> None:
        """A PRM (or the oracle) for the methods that score steps: a one-line ConfigError otherwise."""
        needs = self.step_scored()
        require(not needs or bool(self.prm) or self.oracle, f"{prefix}prm", self.prm,
                f"a PRM directory (or --{prefix}oracle true) for {', '.join(needs)}")


@dataclass
class SearchConfig(SearchSettings, RunConfig):
    run_dir: str = run_dir_option("runs/search", "config.json, search.json (accuracy and tokens per method) and "
                                                 "traces.jsonl (each problem's answer, tokens and trace/tree)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.checkpoint), "checkpoint", self.checkpoint, "a model directory")
        self.require_scorers()


def search_problem(cfg: SearchSettings, method: str, model: nn.Module, tokenizer: Tokenizer, problem: Problem,
                   step_scorer: StepScorer | None, orm: OutcomeScorer | None, seed: int) -> SearchResult:
    """One method on one problem with the settings of `cfg`."""
    params = SamplingParams(temperature=0.0 if method == "greedy" else cfg.temperature,
                            max_new_tokens=cfg.max_new_tokens)
    sampler = Sampler(model, tokenizer, problem.messages(with_solution=False), params, seed)
    if method == "greedy":
        text = sampler.sample([""], 1)[0][0]
        return SearchResult(extract_answer(text), text, 0.0, sampler.tokens, [text], [0.0])
    if method == "vote":
        return majority_vote(sampler, cfg.n)
    if method == "best_of_n":
        return best_of_n(sampler, outcome_of(step_scorer, cfg.aggregate) if step_scorer else orm, cfg.n)
    if method == "beam":
        return step_beam_search(sampler, step_scorer, cfg.beam_width, cfg.expansions, cfg.max_steps + 3,
                                cfg.aggregate)
    rollout = outcome_of(step_scorer, cfg.aggregate) if cfg.mcts_value == "rollout" else None
    return mcts(sampler, step_scorer, cfg.simulations, cfg.expansions, cfg.c, cfg.rule, rollout, cfg.aggregate,
                cfg.max_steps + 3)


def accuracy_stats(correct: list[bool], tokens: list[int]) -> dict[str, float]:
    """Accuracy with its standard error sqrt(p(1-p)/n), and the mean generated tokens per problem."""
    n = max(len(correct), 1)
    p = sum(correct) / n
    return {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / n), "tokens": sum(tokens) / n}


def paired_gap(a: list[bool], b: list[bool]) -> tuple[float, float]:
    """The accuracy gap of method `a` over method `b` on the same problems and its paired standard error: the mean
    of the per-problem differences d = a - b (each -1, 0 or 1) and sqrt(var(d) / n), var with n - 1. Problems
    both solve or both miss add nothing to the variance, so this is tighter than combining two binomial errors."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_gap needs two equally long outcome lists of >= 2 problems, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))


def scaled(cfg: SearchSettings, scale: int) -> SearchSettings:
    """`cfg` with every method's budget times `scale`: samples (vote, best_of_n), expansions (beam), simulations."""
    return dataclasses.replace(cfg, n=cfg.n * scale, expansions=cfg.expansions * scale,
                               simulations=cfg.simulations * scale)


def plot_curve(curve: dict[str, list[dict[str, float]]], png: Path) -> Path:
    """Accuracy (with standard-error bars) against generated tokens per problem, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, points in curve.items():
        ax.errorbar([p["tokens"] for p in points], [p["accuracy"] for p in points],
                    yerr=[p["stderr"] for p in points], marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("test-time compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png"))
    return png


def search_curve(cfg: SearchSettings, model: nn.Module, tokenizer: Tokenizer
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every method of `cfg.methods` on the same held-out problems at every budget scale: (results, traces).

    results: `problems`, `scorer`, `methods` (each method's first point: accuracy, stderr, tokens), `curve`
    (method -> one point per scale, with `outcomes`: solved or not per problem, for paired comparisons) and
    `test_time_curve` (the run report's list of {method, tokens, accuracy,
    stderr, n}: accuracy against mean generated tokens per problem)."""
    device = device_of(model)
    prm = load_prm(cfg.prm, device) if cfg.prm and not cfg.oracle else None
    orm = load_reward_model(cfg.orm, device) if cfg.orm else None
    problems = make_problems(cfg.problems, 2 * cfg.seed + 1, cfg.min_steps, cfg.max_steps)
    curve: dict[str, list[dict[str, float]]] = {}
    traces = []
    for method in cfg.methods:
        for scale in cfg.scales if method != "greedy" else [1]:
            run_cfg = scaled(cfg, scale)
            correct, tokens = [], []
            for i, p in enumerate(problems):
                prompt = p.messages(with_solution=False)
                steps = oracle_step_scorer(p) if cfg.oracle else prm_scorer(prm, tokenizer, prompt) if prm else None
                outcome = (lambda texts, prompt=prompt: score_texts(orm, tokenizer, [prompt] * len(texts), texts)) \
                    if orm else None
                r = search_problem(run_cfg, method, model, tokenizer, p, steps, outcome, seed=cfg.seed * 100_003 + i)
                correct.append(r.answer == p.answer)
                tokens.append(r.tokens)
                traces.append({"method": method, "scale": scale, "prompt": p.prompt, "answer": r.answer,
                               "correct": r.answer == p.answer, "tokens": r.tokens, "response": r.best,
                               "trace": r.trace})
            s = {"scale": scale, **accuracy_stats(correct, tokens), "outcomes": correct}
            curve.setdefault(method, []).append(s)
            print(f"search: {method:<10} x{scale:<3} accuracy {s['accuracy']:.3f} +- {s['stderr']:.3f}  "
                  f"tokens/problem {s['tokens']:.1f}", file=sys.stderr)
    out = {"problems": len(problems), "scorer": "oracle" if cfg.oracle else cfg.prm or cfg.orm or "none",
           "methods": {m: {k: v for k, v in points[0].items() if k not in ("scale", "outcomes")}
                       for m, points in curve.items()},
           "curve": curve,
           "test_time_curve": [{"method": m, "tokens": p["tokens"], "accuracy": p["accuracy"], "stderr": p["stderr"],
                                "n": len(problems)} for m, points in curve.items() for p in points]}
    return out, traces


def run_search(cfg: SearchConfig) -> dict[str, Any]:
    """`search_curve` on the checkpoint: results into RUN/search.json (the curve also drawn in RUN/curve.png when
    there are several scales), traces into RUN/traces.jsonl."""
    model, tokenizer = load_policy(cfg.checkpoint)
    run_dir = open_run(cfg)
    out, traces = search_curve(cfg, model, tokenizer)
    atomic_write_text(run_dir / "traces.jsonl", "".join(json.dumps(t) + "\n" for t in traces))
    atomic_write_json(run_dir / "search.json", out)
    if len(cfg.scales) > 1:
        plot_curve(out["curve"], run_dir / "curve.png")
    print(json.dumps(out["methods"], indent=2))
    return out
