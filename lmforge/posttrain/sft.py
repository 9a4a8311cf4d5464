"""`lmforge sft`: supervised fine-tuning on conversations, loss on assistant tokens only.

Data: conversation files (any format `lmforge.data.formats` reads) and/or `tasks` synthetic
examples from the verifiable task suite. Each conversation is rendered with the tokenizer's chat
template (`chat_data.encode_conversation`). With `packing`, several conversations share one
sequence, and nothing leaks between them: each token attends only to earlier tokens of its own
conversation (attention reset: a block-diagonal causal mask passed as the model's `attn_mask`) and
positions restart at 0 for each conversation (position reset), so a packed conversation's logits are
the ones it would get alone (tested). Evaluation: loss on held-out conversations and greedy
exact-match accuracy on held-out synthetic tasks, before training and every `train.eval_every` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lmforge.core.config import option, require
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.files import atomic_write_text
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.data.formats import Conversation, Message, read_conversations
from lmforge.generate.batch import generate_batch
from lmforge.generate.sampling import SamplingParams
from lmforge.posttrain.stage import Stage, StageConfig, run_dir_option, summary, train_option
from lmforge.tasks.suite import TASK_KINDS, TaskExample, exact_match, make_examples
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import (
    Encoded,
    TemplateNotIncremental,
    encode_conversation,
    encode_turns,
    pad_batch,
    prompt_ids,
    stop_token_ids,
)
from lmforge.train.config import TrainConfig
from lmforge.train.fused_ce import linear_cross_entropy
from lmforge.train.objectives import causal_lm_loss

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class ConversationSource:
    """Where conversations come from (SFT's training data, rejection sampling's prompts): files in `format`,
    plus `tasks` synthetic task-suite examples of `task_kinds` drawn with `task_seed`."""

    format: str = option("auto", "format of the conversation files; auto recognizes each record by its keys")
    tasks: int = option(0, "add this many synthetic task conversations (lmforge.tasks.suite, train split)")
    task_kinds: list[str] = option(default_factory=lambda: list(TASK_KINDS), help="synthetic task kinds")
    task_seed: int = option(0, "seed of the synthetic examples (even: the train split; SFT's held-out examples "
                               "use seed + 1)")

    def __post_init__(self) -> None:
        require(self.tasks >= 0, "tasks", self.tasks, ">= 0")
        require(bool(self.task_kinds) and set(self.task_kinds) <= set(TASK_KINDS), "task_kinds", self.task_kinds,
                f"a non-empty list of {', '.join(TASK_KINDS)}")

    def task_examples(self) -> list[TaskExample]:
        return make_examples(self.tasks, self.task_seed, self.task_kinds)


@dataclass
class SftConfig(ConversationSource, StageConfig):
    run_dir: str = run_dir_option("runs/sft", "config.json, checkpoints, metrics, plots and RUN/model (RUN/adapter "
                                              "under PEFT)")
    train: TrainConfig = train_option(steps=300, lr=1e-3, warmup_steps=20, eval_every=100, save_every=100,
                                      log_every=10)
    data: list[str] = option(default_factory=list, help="conversation files or directories (alpaca, sharegpt, chat, "
                                                        "oasst, flan, self-instruct; JSONL or a JSON array)")
    eval_tasks: int = option(120, "held-out synthetic examples scored by greedy exact match; 0 disables")
    val_fraction: float = option(0.05, "share of the data files' conversations held out for the validation loss")
    max_len: int = option(0, "tokens per training sequence; 0 means the model's max_seq_len")
    too_long: Literal["truncate", "reject"] = option(
        "truncate", "a conversation over max_len tokens is cut (counted warning) or dropped (listed in "
                    "RUN/rejected.jsonl with the reason)")
    packing: bool = option(True, "pack several conversations per sequence (attention and position reset)")
    batch_size: int = option(16, "sequences per micro-batch")
    max_new_tokens: int = option(16, "generation budget of the exact-match evaluation")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.eval_tasks >= 0, "eval_tasks", self.eval_tasks, ">= 0")
        require(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "in [0, 1)")
        require(self.max_len >= 0, "max_len", self.max_len, ">= 0")
        require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")


# ----------------------------------------------------------------------------------------------
# packing


def task_messages(example: TaskExample, with_answer: bool = True) -> list[Message]:
    """A synthetic example as a chat: the prompt from the user, the answer from the assistant."""
    user = [{"role": "user", "content": example.prompt}]
    return [*user, {"role": "assistant", "content": example.answer}] if with_answer else user


def pack(encoded: Sequence[Encoded], max_len: int) -> list[list[int]]:
    """Greedy first-fit-in-order packing: indices of the conversations in each row of <= max_len tokens."""
    rows: list[list[int]] = []
    used = max_len + 1
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        if used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def collate_packed(rows: Sequence[Sequence[Encoded]], pad_id: int, width: int = 0) -> dict[str, Tensor]:
    """Rows of concatenated conversations: input_ids, labels, positions (restarting at 0 per
    conversation) and segment ids (conversation index within its row; -1 on padding), all [B, T].
    T is `width`, or the longest row when 0 (a fixed width keeps shapes static for torch.compile)."""
    width = max(width, *(sum(len(e.input_ids) for e in row) for row in rows))
    shape = (len(rows), width)
    inputs = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row):
            n = len(e.input_ids)
            inputs[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at:at + n] = torch.tensor(e.labels)
            positions[r, at:at + n] = torch.arange(n)
            segments[r, at:at + n] = s
            at += n
    return {"input_ids": inputs, "labels": labels, "positions": positions, "segments": segments}


def packed_attention_mask(segments: Tensor) -> Tensor:
    """[B, 1, T, T] bool, True = may attend: causal and within the same conversation (block diagonal).
    Padding (segment -1) attends to padding only, so no softmax row is empty."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal)[:, None]


class SftBatches:
    """Shuffled epochs over encoded conversations, packed or padded; resumable by (epoch, batch index)."""

    def __init__(self, encoded: list[Encoded], batch_size: int, max_len: int, packing: bool, pad_id: int,
                 seed: int = 0) -> None:
        if not encoded:
            raise LmforgeError("sft: no training conversations (give data files or tasks > 0)")
        self.encoded, self.batch_size, self.max_len = encoded, batch_size, max_len
        self.packing, self.pad_id, self.seed = packing, pad_id, seed
        self.epoch, self.index = 0, 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[list[int]]]:
        order = list(range(len(self.encoded)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        if self.packing:
            rows = [[order[i] for i in row] for row in pack([self.encoded[i] for i in order], self.max_len)]
        else:
            rows = [[i] for i in order]
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def next_batch(self) -> dict[str, Tensor]:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        rows = self._batches[self.index]
        self.index += 1
        batch = collate_packed([[self.encoded[i] for i in row] for row in rows], self.pad_id,
                               self.max_len if self.packing else 0)
        if not self.packing:
            del batch["positions"], batch["segments"]  # plain causal attention over right-padded rows
        return batch

    @staticmethod
    def rank_slice(batch: dict[str, Tensor], rank: int, world: int) -> dict[str, Tensor]:
        """Rank `rank`'s rows of a global batch (as equal as the row count allows), with `loss_scale` =
        world x its share of the batch's loss tokens: averaged over ranks (DDP/FSDP average gradients), the
        scaled per-rank means give the global token mean, so N processes repeat one."""
        rows = len(batch["input_ids"])
        if rows < world:
            raise LmforgeError(f"sft: a batch of {rows} sequences cannot give each of the {world} data-parallel "
                               "processes a sequence; raise batch_size (or give more data) or use fewer processes")
        idx = torch.arange(rows).tensor_split(world)[rank]
        out = {k: v[idx] for k, v in batch.items()}
        total = int((batch["labels"] != IGNORE_INDEX).sum())
        mine = int((out["labels"] != IGNORE_INDEX).sum())
        out["loss_scale"] = torch.tensor(world * mine / max(total, 1))
        out["batch_loss_tokens"] = torch.tensor(total)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._batches = self._epoch_batches(self.epoch)


# ----------------------------------------------------------------------------------------------
# loss and evaluation


def prompt_prefix(labels: Tensor, positions: Tensor | None = None) -> Tensor:
    """[B, T] bool: the tokens of each conversation's prompt, up to its first answer (every token before the
    first labelled position, and that one: it is the prompt's last token, whose label is the answer's first).
    `positions` (restarting at 0 per conversation, as `collate_packed` makes them) tells packed conversations
    apart. A row with no label is prompt throughout."""
    labelled = (labels != IGNORE_INDEX).long()
    before = labelled.cumsum(-1) - labelled  # labelled tokens before t in the row
    if positions is not None:  # ... and before the start of t's conversation
        starts = torch.arange(labels.shape[1], device=labels.device)[None, :] - positions
        before = before - before.gather(-1, starts)
    return before == 0


def prefix_kwargs(model: nn.Module, labels: Tensor, segments: Tensor | None = None,
                  positions: Tensor | None = None) -> dict[str, Tensor]:
    """A prefix LM (`model.cfg.prefix_lm`) reads each conversation's prompt bidirectionally, as generate and serve
    read it (`lmforge.generate.prompt.prefill_kwargs`): `prefix_len` per row as the prefix objective passes it,
    or, for packed rows, the block-diagonal mask opened over each conversation's prompt. The answer stays causal.
    Nothing for a causal model (packed rows: their block-diagonal mask)."""
    prefix_lm = bool(getattr(getattr(model, "cfg", None), "prefix_lm", False))
    if segments is None:
        return {"prefix_len": prompt_prefix(labels).sum(-1)} if prefix_lm else {}
    mask = packed_attention_mask(segments)
    if prefix_lm:
        same = segments[:, :, None] == segments[:, None, :]
        mask = mask | (same & prompt_prefix(labels, positions)[:, None, :])[:, None]
    return {"positions": positions, "attn_mask": mask}


def sft_forward(model: nn.Module, batch: dict[str, Tensor], return_hidden: bool = False) -> Tensor:
    """The model on a (possibly packed) batch: packed rows get position reset and the block-diagonal mask; a
    prefix LM reads each prompt as its bidirectional prefix (`prefix_kwargs`)."""
    kwargs = prefix_kwargs(model, batch["labels"], batch.get("segments"), batch.get("positions"))
    return model(batch["input_ids"], return_hidden=return_hidden, **kwargs)


def sft_loss(model: nn.Module, batch: dict[str, Tensor], fused: bool = True) -> tuple[Tensor, dict[str, Any]]:
    """Mean cross-entropy over assistant tokens (labels not IGNORE_INDEX) of the batch; a rank's slice of a
    global batch (`SftBatches.rank_slice`) scales its mean by its `loss_scale`."""
    n_tokens = int(batch.get("batch_loss_tokens", (batch["labels"] != IGNORE_INDEX).sum()))
    head = getattr(model, "lm_head", None)
    if fused and type(head) is nn.Linear:  # a PEFT-wrapped head runs unfused
        loss = linear_cross_entropy(sft_forward(model, batch, return_hidden=True), head.weight, batch["labels"],
                                    bias=head.bias, skip_ignored=True)
    else:
        loss = causal_lm_loss(sft_forward(model, batch), batch["labels"])
    if "loss_scale" in batch:
        loss = loss * batch["loss_scale"]
    return loss, {"loss_tokens": n_tokens}


@torch.no_grad()
def validation_loss(model: nn.Module, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 16) -> float:
    """Token-weighted mean loss over assistant tokens of held-out conversations (unpacked)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(encoded), batch_size):
            inputs, labels = pad_batch(encoded[i:i + batch_size], pad_id)
            inputs, labels = inputs.to(device), labels.to(device)
            n = int((labels != IGNORE_INDEX).sum())
            if n:
                total += float(causal_lm_loss(model(inputs, **prefix_kwargs(model, labels)), labels, reduction="sum"))
                count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


def complete(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[list[Message]], params: SamplingParams,
             num_return_sequences: int = 1, batch_size: int = 64) -> list[str]:
    """Assistant replies to chat prompts (prompt-major: the samples of prompt i are i*n .. i*n+n-1)."""

    params = dataclasses.replace(params, stop_token_ids=params.stop_token_ids or stop_token_ids(tokenizer))
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    out: list[str] = []
    for i in range(0, len(ids), batch_size):
        seed = None if params.seed is None else params.seed + i
        rows = generate_batch(model, ids[i:i + batch_size], params, num_return_sequences, seed=seed)
        out += [tokenizer.decode(r) for r in rows]
    return out


def task_accuracy(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[TaskExample],
                  max_new_tokens: int = 16) -> float:
    """Greedy exact-match accuracy on synthetic task examples."""
    params = SamplingParams(greedy=True, max_new_tokens=max_new_tokens)
    completions = complete(model, tokenizer, [task_messages(e, with_answer=False) for e in examples], params)
    return exact_match(examples, completions)


def accuracy_by_kind(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[TaskExample],
                     max_new_tokens: int = 16) -> dict[str, float]:
    kinds = sorted({e.kind for e in examples})
    return {k: task_accuracy(model, tokenizer, [e for e in examples if e.kind == k], max_new_tokens) for k in kinds}


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class SftData:
    train: list[Encoded]
    val: list[Encoded]
    truncated: int
    rejected: list[tuple[str, str]]  # (source, reason)


def encode_all(tokenizer: Tokenizer, conversations: Sequence[Conversation], max_len: int,
               too_long: str) -> tuple[list[Encoded], int, list[tuple[str, str]]]:
    """Encode; count truncations, or reject over-long conversations with a reason. A conversation with no
    assistant token left after truncation is rejected either way. Where the chat template rewrites earlier
    turns (and has no `{% generation %}` blocks), each assistant turn is an example of its own."""
    kept, truncated, rejected = [], 0, []
    for conv in conversations:
        encoded = encode_examples(tokenizer, conv.messages, max_len)
        if any(e.truncated for e in encoded) and too_long == "reject":
            full = max(len(e.input_ids) for e in encode_examples(tokenizer, conv.messages, 1 << 30))
            rejected.append((conv.source, f"{full} tokens, over max_len {max_len}"))
        elif not any(e.n_loss_tokens for e in encoded):
            rejected.append((conv.source, f"no assistant token within max_len {max_len}"))
        else:
            truncated += any(e.truncated for e in encoded)
            kept += [e for e in encoded if e.n_loss_tokens]
    return kept, truncated, rejected


def encode_examples(tokenizer: Tokenizer, messages: list[Message], max_len: int) -> list[Encoded]:
    """The conversation as one example, or one per assistant turn where the template cannot mask it whole."""
    try:
        return [encode_conversation(tokenizer, messages, max_len)]
    except TemplateNotIncremental:
        return encode_turns(tokenizer, messages, max_len)


def load_sft_data(cfg: SftConfig, tokenizer: Tokenizer, max_len: int) -> SftData:
    """Data files (split into train/val) + synthetic task conversations, encoded; the validation set also
    holds the held-out task examples."""
    files = [c for path in cfg.data for c in read_conversations(path, cfg.format)]
    random.Random(cfg.seed).shuffle(files)
    n_val = int(len(files) * cfg.val_fraction) if len(files) > 1 else 0
    if cfg.val_fraction > 0 and len(files) > 1:
        n_val = max(n_val, 1)
    train_convs = files[n_val:]
    train_convs += [Conversation(task_messages(e), f"task:{e.kind}:{i}") for i, e in enumerate(cfg.task_examples())]
    val_convs = files[:n_val] + [Conversation(task_messages(e), f"heldout-task:{e.kind}:{i}")
                                 for i, e in enumerate(held_out_examples(cfg))]
    train, truncated, rejected = encode_all(tokenizer, train_convs, max_len, cfg.too_long)
    val, _, _ = encode_all(tokenizer, val_convs, max_len, "truncate")
    return SftData(train, val, truncated, rejected)


def held_out_examples(cfg: SftConfig) -> list[TaskExample]:
    seed = cfg.task_seed + 1 if cfg.task_seed % 2 == 0 else cfg.task_seed
    return make_examples(cfg.eval_tasks, seed, cfg.task_kinds)


# ----------------------------------------------------------------------------------------------
# the command


@contextlib.contextmanager
def without_virtual_tokens(model: nn.Module) -> Iterator[None]:
    """Run `model` without its prompt/prefix-tuning positions for a while (other PEFT methods start as identity)."""
    saved = getattr(model, "virtual_tokens", None)
    if saved is not None:
        model.virtual_tokens = None
    try:
        yield
    finally:
        if saved is not None:
            model.virtual_tokens = saved


def run_sft(cfg: SftConfig) -> dict[str, Any]:
    """Fine-tune `cfg.checkpoint`; the result goes to RUN/model (or RUN/adapter under PEFT) with the tokenizer.

    Returns {"steps", "final_loss", "val_loss", "exact_match", "base_val_loss", "base_exact_match",
    "model_dir", "train_conversations", "truncated", "rejected"}.
    """

    with Stage("sft", cfg) as stage:
        model, tokenizer = stage.policy, stage.tokenizer
        stage.add_peft()
        virtual = getattr(getattr(model, "virtual_tokens", None), "n_tokens", 0)  # prompt/prefix tuning positions
        room = model.cfg.max_seq_len - virtual
        max_len = cfg.max_len or room
        if max_len > room:
            raise ConfigError(f"max_len {max_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}"
                              + (f" minus {virtual} virtual tokens" if virtual else ""))
        data = load_sft_data(cfg, tokenizer, max_len)
        run_dir = stage.open()
        if data.truncated:
            print(f"warning: {data.truncated} of {len(data.train)} training conversations were longer than max_len "
                  f"{max_len} tokens and were truncated", file=sys.stderr)
        if data.rejected and stage.is_main:
            atomic_write_text(run_dir / "rejected.jsonl", "".join(
                json.dumps({"source": s, "reason": r}) + "\n" for s, r in data.rejected))
            print(f"warning: {len(data.rejected)} conversations rejected (first: {data.rejected[0][0]}: "
                  f"{data.rejected[0][1]}); all listed in {run_dir / 'rejected.jsonl'}", file=sys.stderr)
        pad_id = stage.pad_id
        batches = SftBatches(data.train, cfg.batch_size, max_len, cfg.packing, pad_id, cfg.seed)
        held_out = held_out_examples(cfg)

        def evaluate(m: nn.Module) -> dict[str, float]:
            out = {}
            if data.val:
                out["val_loss"] = validation_loss(m, data.val, pad_id, cfg.batch_size)
            if held_out:
                out["exact_match"] = task_accuracy(m, tokenizer, held_out, cfg.max_new_tokens)
            return out

        with without_virtual_tokens(model):  # the base model, not the base plus untrained soft prompts
            base = {f"base_{k}": v for k, v in evaluate(model).items()}
        if base:
            print("sft: base model " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in base.items()), file=sys.stderr)
        n_tokens = sum(len(e.input_ids) for e in data.train)
        print(f"sft: {len(data.train)} conversations ({n_tokens:,} tokens), {len(data.val)} held out, "
              f"{'packed' if cfg.packing else 'padded'} into sequences of <= {max_len} tokens", file=sys.stderr)
        fused = cfg.train.fused_ce
        result = stage.fit(model, lambda m, b: sft_loss(m, b, fused), batches, evaluate if base else None)
        out_dir = stage.save("model" if cfg.peft.method == "none" else "adapter")
        out = summary(result, out_dir, val_loss=result.get("val_loss"), exact_match=result.get("exact_match"),
                      **base, train_conversations=len(data.train), truncated=data.truncated,
                      rejected=len(data.rejected))
        shown = [f"{k} {out[k]:.4f}" for k in ("base_exact_match", "exact_match", "base_val_loss", "val_loss")
                 if out.get(k) is not None]
        print(f"sft: {out['steps']} steps, final loss {out['final_loss']:.4f}; {', '.join(shown)} -> {out_dir}")
        return out
