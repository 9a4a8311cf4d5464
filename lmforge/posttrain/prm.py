"""`lmforge prm`: a process reward model, trained on step labels that rollouts produce (Math-Shepherd).

A PRM is the reward model of `lmforge reward` (a backbone and reward.py's scalar head) read at the end of
every reasoning step instead of only at the last token: sigmoid(logit) at a step's last token is the
probability that the solution so far can still reach the right answer. The logit is the head on the hidden
state there (`score="hidden"`) or, by default, a scaled lowest token log-probability of the LM over the
solution so far (`score="likelihood"`, `ProcessRewardModel`), which a small model learns far better.

Labels need no human (Wang et al. 2024, Math-Shepherd): the policy samples solutions to training problems;
from the prefix that ends at each step, `rollouts` continuations are sampled; a step is good ("hard
estimation") when at least one continuation reaches the right answer, or is the fraction that do ("soft").
The answer step is good when the answer is right. The PRM is trained with binary cross-entropy on every step
end, class-weighted by default: rollout labels of a weak policy are mostly "bad" (a few percent good), and
unweighted BCE then learns to call every step bad, so the good steps' loss is weighted by the ratio of bad to
good labels (`pos_weight`: both classes weigh the same in the loss). Its step-level accuracy is
measured on held-out problems against the task family's true labels (`tasks.reasoning.step_labels`), plain and
balanced (the mean of the per-class recalls: under a 95/5 split plain accuracy rewards the constant "bad"), as is
the agreement of the rollout labels themselves.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.core.config import option, require
from lmforge.core.files import atomic_write_text
from lmforge.data.formats import Message
from lmforge.generate.batch import generate_batch
from lmforge.generate.sampling import SamplingParams
from lmforge.model.transformer import Transformer
from lmforge.peft.lora import merge_lora
from lmforge.posttrain.models import copy_tokenizer, device_of, pad_id_of
from lmforge.posttrain.reward import RewardModel, load_reward_model, save_reward_model
from lmforge.posttrain.rollout import token_logps
from lmforge.posttrain.stage import Stage, StageConfig, run_dir_option, summary, train_option
from lmforge.tasks.reasoning import Problem, StepRange, make_problems, split_steps, step_labels, verify
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import prompt_ids, stop_token_ids
from lmforge.train.config import TrainConfig

# ----------------------------------------------------------------------------------------------
# scoring steps


@dataclass
class StepExample:
    input_ids: list[int]  # prompt + response tokens
    positions: list[int]  # index of each step's last token in input_ids
    labels: list[float]  # one per position (training targets), empty when only scoring
    start: int = 0  # index of the first response token (where the first step begins)


def encode_steps(tokenizer: Tokenizer, prompt: list[Message], response: str, max_len: int,
                 labels: list[float] | None = None) -> StepExample:
    """Prompt and response tokens, and the position of each step's last token (the token whose text completes
    the step's line); steps cut off by `max_len` are read at the last position."""
    base = prompt_ids(tokenizer, prompt)
    resp = tokenizer.encode(response)
    ids = (base + resp)[:max_len]
    ends, total = [], 0
    for t in resp:
        total += len(tokenizer.decode([t], skip_special_tokens=False))
        ends.append(total)
    positions, j = [], 0
    for step in split_steps(response):
        while j < len(resp) - 1 and ends[j] < step.end:
            j += 1
        positions.append(min(len(base) + j, len(ids) - 1))
    return StepExample(ids, positions, list(labels or []), min(len(base), len(ids) - 1))


PrmScore = Literal["hidden", "likelihood"]


class ProcessRewardModel(RewardModel):
    """A reward model read at every step end, in one of two ways (`score`):

    - "hidden": the head on the hidden state at the step's last token (a reward model read per step).
    - "likelihood": `likelihood_scale` * (the lowest log-probability the LM gives any response token up to the
      step's end) + the head's bias; the head's weight stays 0. A wrong step is most often one surprising token
      (a wrong result) and the LM already computes that surprise; the minimum runs over the whole solution so
      far, so a step after a wrong one scores no higher than it (first-error labels). Training moves the LM's
      own probabilities, which a 6.5M-parameter model learns from a few thousand step labels where a new head
      on its hidden states does not (measured in benchmarks/RESULTS.md)."""

    def __init__(self, backbone: Transformer, score: PrmScore = "hidden") -> None:
        super().__init__(backbone)
        self.score_kind = score
        if score == "likelihood":
            nn.init.zeros_(self.head.weight)
            self.head.weight.requires_grad_(False)
            self.likelihood_scale = nn.Parameter(torch.ones(()))

    def head_state(self) -> dict[str, Tensor]:
        state = super().head_state()
        if self.score_kind == "likelihood":
            state["likelihood_scale"] = self.likelihood_scale.detach().reshape(1).contiguous()
        return state

    def load_head_state(self, state: dict[str, Tensor]) -> None:
        super().load_head_state(state)
        if self.score_kind == "likelihood":
            with torch.no_grad():
                self.likelihood_scale.copy_(state["likelihood_scale"].reshape(()))


def load_prm(directory: str | Path, device: str | torch.device = "cpu") -> ProcessRewardModel:
    """A PRM directory `lmforge prm` wrote, of either score kind (a "likelihood" PRM's head file holds its
    `likelihood_scale`); any other reward model directory loads as a "hidden" PRM."""
    return load_reward_model(directory, device, lambda backbone, state: ProcessRewardModel(
        backbone, "likelihood" if "likelihood_scale" in state else "hidden"))  # type: ignore[return-value]


def step_logits(rm: RewardModel, input_ids: Tensor, starts: Tensor | None = None) -> Tensor:
    """The PRM's logit at every position [B, T] of right-padded `input_ids` (read at step ends). A "likelihood"
    PRM needs `starts` [B]: the index of each row's first response token."""
    h = rm.backbone(input_ids, return_hidden=True)
    logits = rm.head(h.to(rm.head.weight.dtype)).squeeze(-1).float()
    if getattr(rm, "score_kind", "hidden") == "likelihood":
        if starts is None:
            raise ValueError("a likelihood PRM reads the response from its start: pass `starts`")
        lp = token_logps(rm.backbone.lm_head(h)[:, :-1], input_ids[:, 1:])  # of token t + 1, at t
        lp = torch.cat([lp.new_zeros(len(lp), 1), lp], dim=1)  # log p(token t); nothing predicts token 0
        before = torch.arange(lp.shape[1], device=lp.device) < starts.to(lp.device)[:, None]
        logits = logits + rm.likelihood_scale * lp.masked_fill(before, 0.0).cummin(dim=1).values
    return logits


def _collate(examples: list[StepExample], pad_id: int) -> dict[str, Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), -1.0)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for r, e in enumerate(examples):
        ids[r, :len(e.input_ids)] = torch.tensor(e.input_ids)
        for p, y in zip(e.positions, e.labels or [0.0] * len(e.positions)):
            targets[r, p], mask[r, p] = y, True
    starts = torch.tensor([e.start for e in examples])
    return {"input_ids": ids, "targets": targets, "mask": mask, "starts": starts}


@torch.no_grad()
def score_steps(rm: RewardModel, tokenizer: Tokenizer, prompt: list[Message], responses: list[str],
                batch_size: int = 32) -> list[list[float]]:
    """P(good) of every step of every response (sigmoid of the head at each step end)."""
    out: list[list[float]] = []
    for i in range(0, len(responses), batch_size):
        enc = [encode_steps(tokenizer, prompt, r, rm.cfg.max_seq_len) for r in responses[i:i + batch_size]]
        if not any(e.positions for e in enc):
            out += [[] for _ in enc]
            continue
        batch = _collate(enc, pad_id_of(tokenizer))
        probs = torch.sigmoid(step_logits(rm, batch["input_ids"].to(device_of(rm)), batch["starts"]))
        out += [probs[r, e.positions].tolist() for r, e in enumerate(enc)]
    return out


def prm_scorer(rm: RewardModel, tokenizer: Tokenizer, prompt: list[Message]):
    """The PRM as a step scorer for `lmforge.posttrain.search` (texts -> per-step scores)."""
    return lambda texts: score_steps(rm, tokenizer, prompt, texts)


# ----------------------------------------------------------------------------------------------
# Math-Shepherd labels


@torch.no_grad()
def sample_texts(model: nn.Module, tokenizer: Tokenizer, prompts: list[list[Message]], prefixes: list[str], n: int,
                 params: SamplingParams, seed: int, batch_size: int = 256) -> list[str]:
    """`n` completions of each (prompt, response prefix), prefix included; rows prompt-major."""
    params = dataclasses.replace(params, stop_token_ids=stop_token_ids(tokenizer))
    starts = [prompt_ids(tokenizer, p) + tokenizer.encode(x) for p, x in zip(prompts, prefixes)]
    out = []
    for i in range(0, len(starts), batch_size):
        rows = generate_batch(model, starts[i:i + batch_size], params, n, seed=seed + i)
        out += [prefixes[i + k // n] + tokenizer.decode(r) for k, r in enumerate(rows)]
    return out


def rollout_labels(model: nn.Module, tokenizer: Tokenizer, problems: list[Problem], samples: int, rollouts: int,
                   params: SamplingParams, seed: int = 0, soft: bool = False
                   ) -> list[tuple[Problem, str, list[float]]]:
    """(problem, sampled solution, label per step): Math-Shepherd's estimate of each step from `rollouts`
    continuations of the prefix ending there (hard: any reaches the answer; soft: the fraction that do)."""
    prompts = [p.messages(with_solution=False) for p in problems]
    sols = sample_texts(model, tokenizer, prompts, [""] * len(problems), samples, params, seed)
    items = [(problems[k // samples], s) for k, s in enumerate(sols)]
    queries = [(i, s.end) for i, (_, text) in enumerate(items) for s in split_steps(text)[:-1]]
    conts = sample_texts(model, tokenizer, [items[i][0].messages(False) for i, _ in queries],
                         [items[i][1][:end] for i, end in queries], rollouts, params, seed + 1_000_003)
    hits: dict[int, list[float]] = {}
    for q, (i, _) in enumerate(queries):
        wins = [verify(items[i][0], c) for c in conts[q * rollouts:(q + 1) * rollouts]]
        hits.setdefault(i, []).append(sum(wins) / rollouts if soft else float(max(wins)))
    out = []
    for i, (p, text) in enumerate(items):
        if split_steps(text):
            out.append((p, text, hits.get(i, []) + [verify(p, text)]))
    return out


def label_agreement(labelled: list[tuple[Problem, str, list[float]]]) -> float:
    """How often a (rounded) rollout label equals the true step label."""
    pairs = [(y >= 0.5, t) for p, text, ys in labelled for y, t in zip(ys, step_labels(p, text))]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


@torch.no_grad()
def step_accuracy(rm: RewardModel, tokenizer: Tokenizer, labelled: list[tuple[Problem, str, Any]]) -> dict[str, float]:
    """The PRM's step classification (P(good) > 0.5) against the true step labels: accuracy over all steps; the
    share of truly good steps called good, of bad steps called bad, and of first wrong steps called bad (a PRM
    that calls every step bad scores 0 on the first, one that calls every step good 0 on the others); balanced
    accuracy, the mean of the good and bad recalls (0.5 for any constant answer); and the share of good steps
    (the accuracy of always answering "bad" is one minus it)."""
    hits = good_hits = n_good = bad_hits = first_err = n_first = total = 0
    for p, text, _ in labelled:
        scores = score_steps(rm, tokenizer, p.messages(False), [text])[0]
        truth = step_labels(p, text)
        for k, (s, t) in enumerate(zip(scores, truth)):
            hits += (s > 0.5) == t
            total += 1
            n_good += t
            good_hits += t and s > 0.5
            bad_hits += not t and s <= 0.5
            if not t and (k == 0 or truth[k - 1]):
                n_first += 1
                first_err += s <= 0.5
    good_recall, bad_recall = good_hits / max(n_good, 1), bad_hits / max(total - n_good, 1)
    return {"step_accuracy": hits / max(total, 1), "balanced_step_accuracy": (good_recall + bad_recall) / 2,
            "good_step_recall": good_recall, "bad_step_recall": bad_recall,
            "first_error_recall": first_err / max(n_first, 1), "good_step_share": n_good / max(total, 1)}


# ----------------------------------------------------------------------------------------------
# training


@dataclass
class PrmConfig(StageConfig, StepRange):
    run_dir: str = run_dir_option("runs/prm", "config.json, checkpoints, metrics, labels.jsonl and RUN/model "
                                              "(backbone + reward_head.safetensors)")
    train: TrainConfig = train_option(steps=200, lr=5e-5, warmup_steps=10, weight_decay=0.0, log_every=10,
                                      eval_every=100, save_every=0, plot_every=0)
    problems: int = option(64, "training problems (train split) whose sampled solutions get rollout labels")
    heldout_problems: int = option(32, "held-out problems for the step accuracy against the true labels")
    samples: int = option(4, "solutions sampled per problem")
    rollouts: int = option(4, "continuations per step prefix that estimate the step's label")
    labels: Literal["hard", "soft"] = option("hard", "hard: good if any rollout reaches the answer; soft: the "
                                                     "fraction that do")
    temperature: float = option(1.0, "sampling temperature of solutions and rollouts")
    max_new_tokens: int = option(64, "token budget of a solution or rollout")
    batch_size: int = option(16, "solutions per training batch")
    balance: bool = option(True, "class-weighted BCE: weight the good steps' loss by the ratio of bad to good "
                                 "rollout labels, so rare good steps are not drowned out (false: plain BCE)")
    score: PrmScore = option("likelihood", "how a step is scored: likelihood (the LM's lowest token log-probability "
                                           "in the solution so far, scaled; learns at lr ~5e-5) or hidden (a new "
                                           "linear head on the step end's hidden state; wants lr ~1e-3)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("problems", "heldout_problems", "samples", "rollouts", "max_new_tokens", "batch_size"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(self.temperature > 0, "temperature", self.temperature, "> 0 (rollouts must sample)")
        require(self.peft.method in ("none", "lora"), "peft.method", self.peft.method, "none or lora for the PRM")


class StepBatches:
    """Shuffled epochs of step-labelled solutions for `train_loop`; resumable by (epoch, position)."""

    def __init__(self, examples: list[StepExample], batch_size: int, pad_id: int, seed: int = 0) -> None:
        self.examples, self.batch_size, self.pad_id, self.seed = examples, min(batch_size, len(examples)), pad_id, seed
        self.epoch, self.position = 0, 0

    def next_batch(self) -> dict[str, Tensor]:
        if self.position + self.batch_size > len(self.examples):
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        idx = order[self.position:self.position + self.batch_size].tolist()
        self.position += self.batch_size
        return _collate([self.examples[i] for i in idx], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def balance_weight(labels: list[float]) -> float:
    """BCE's `pos_weight` that gives the good and the bad steps equal total weight: the bad label mass over the
    good (soft labels count fractionally); 1.0 when either class is absent."""
    good = sum(labels)
    bad = len(labels) - good
    return bad / good if good > 0 and bad > 0 else 1.0


def prm_loss(rm: RewardModel, batch: dict[str, Tensor], pos_weight: float = 1.0) -> tuple[Tensor, dict[str, float]]:
    """Binary cross-entropy of the head's logit at every step end against the step's (soft) label, the good
    term weighted by `pos_weight`: mean of -(w y log s + (1 - y) log(1 - s)), s = sigmoid(logit)."""
    logits = step_logits(rm, batch["input_ids"], batch["starts"])[batch["mask"]]
    targets = batch["targets"][batch["mask"]]
    loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor(pos_weight))
    said, good = logits > 0, targets >= 0.5
    recalls = [(said[c] == good[c]).float().mean().item() for c in (good, ~good) if c.any()]
    return loss, {"step_accuracy": (said == good).float().mean().item(),
                  "balanced_step_accuracy": sum(recalls) / max(len(recalls), 1)}


def calibrate_likelihood(rm: ProcessRewardModel, examples: list[StepExample], pad_id: int, pos_weight: float,
                         iterations: int = 300, batch_size: int = 64) -> tuple[float, float] | None:
    """Fit a likelihood PRM's `likelihood_scale` and bias to the step labels by (class-weighted) logistic
    regression on the LM's features as they are, before any fine-tuning moves the LM: the two numbers that turn
    "the lowest log-probability so far" into P(good). The scale stays >= 0. Returns (scale, bias), or None when
    the labels are all of one class (scale 1, bias 0 are kept)."""
    device = device_of(rm)
    features, targets = [], []
    with torch.no_grad():
        rm.likelihood_scale.fill_(1.0)
        rm.head.bias.zero_()
        for i in range(0, len(examples), batch_size):
            batch = _collate(examples[i:i + batch_size], pad_id)
            features.append(step_logits(rm, batch["input_ids"].to(device), batch["starts"])[batch["mask"]].cpu())
            targets.append(batch["targets"][batch["mask"]])
    x, y = torch.cat(features), torch.cat(targets)
    scale, bias = torch.ones((), requires_grad=True), torch.zeros((), requires_grad=True)
    if not ((y >= 0.5).any() and (y < 0.5).any()):  # one class only: nothing to separate, keep the identity
        return None
    opt = torch.optim.Adam([scale, bias], lr=0.05)
    for _ in range(iterations):
        loss = F.binary_cross_entropy_with_logits(scale * x + bias, y, pos_weight=torch.tensor(pos_weight))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            scale.clamp_(min=0.0)  # a less likely step never scores higher
    with torch.no_grad():
        rm.likelihood_scale.fill_(scale.item())
        rm.head.bias.fill_(bias.item())
    return scale.item(), bias.item()


def run_prm(cfg: PrmConfig) -> dict[str, Any]:
    """Label steps by rollouts, train the PRM, report its step accuracy against the true labels."""
    stage = Stage("prm", cfg)
    policy, tok = stage.policy, stage.tokenizer
    params = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    train_p = make_problems(cfg.problems, 2 * cfg.seed, cfg.min_steps, cfg.max_steps)
    held_p = make_problems(cfg.heldout_problems, 2 * cfg.seed + 1, cfg.min_steps, cfg.max_steps)
    labelled = rollout_labels(policy, tok, train_p, cfg.samples, cfg.rollouts, params, cfg.seed, cfg.labels == "soft")
    held_texts = sample_texts(policy, tok, [p.messages(False) for p in held_p], [""] * len(held_p), 1, params,
                              cfg.seed + 7)
    held = [(p, t, None) for p, t in zip(held_p, held_texts) if split_steps(t)]
    if not labelled:
        print("prm: the policy wrote no steps; train it on the task first (`lmforge sft`)", file=sys.stderr)
    agreement = label_agreement(labelled)
    examples = [encode_steps(tok, p.messages(False), text, policy.cfg.max_seq_len, ys) for p, text, ys in labelled]
    step_ys = [y for e in examples for y in e.labels]
    pos_weight = balance_weight(step_ys) if cfg.balance else 1.0
    torch.manual_seed(cfg.seed)
    stage.add_peft()
    rm = ProcessRewardModel(policy, cfg.score).to(stage.device)
    if cfg.score == "likelihood" and examples:
        fit = calibrate_likelihood(rm, examples, stage.pad_id, pos_weight)
        print("prm: likelihood score " + (f"calibrated on the labels: logit = {fit[0]:.3f} * lowest log-probability "
                                          f"{fit[1]:+.3f}" if fit else "not calibrated: every label is of one class"),
              file=sys.stderr)
    run_dir = stage.open()
    atomic_write_text(run_dir / "labels.jsonl", "".join(
        json.dumps({"prompt": p.prompt, "response": t, "labels": ys, "true_labels": step_labels(p, t)}) + "\n"
        for p, t, ys in labelled))
    before = step_accuracy(rm.eval(), tok, held)
    share = sum(step_ys) / max(len(step_ys), 1)
    print(f"prm: {len(examples)} labelled solutions ({len(step_ys)} steps, {share:.3f} good; good-step weight "
          f"{pos_weight:.2f}; rollout labels agree with the true ones on {agreement:.3f}); held-out step accuracy "
          f"before {before['step_accuracy']:.3f}", file=sys.stderr)
    result = stage.fit(rm, partial(prm_loss, pos_weight=pos_weight),
                       StepBatches(examples, cfg.batch_size, stage.pad_id, cfg.seed),
                       lambda m: step_accuracy(m, tok, held))
    if cfg.peft.method == "lora":
        merge_lora(rm.backbone)
    after = step_accuracy(rm.eval(), tok, held)
    model_dir = save_reward_model(rm, run_dir / "model")
    copy_tokenizer(cfg.checkpoint, model_dir)
    out = summary(result, model_dir, label_agreement=agreement, step_accuracy_before=before["step_accuracy"],
                  **after, labelled_solutions=len(examples), pos_weight=pos_weight)
    print(f"prm: held-out step accuracy {before['step_accuracy']:.3f} -> {after['step_accuracy']:.3f}, balanced "
          f"{before['balanced_step_accuracy']:.3f} -> {after['balanced_step_accuracy']:.3f} (good steps "
          f"called good {after['good_step_recall']:.3f}, bad steps called bad {after['bad_step_recall']:.3f}, "
          f"first wrong steps called bad "
          f"{after['first_error_recall']:.3f}; {after['good_step_share']:.3f} of the steps are good) -> {model_dir}")
    return out
