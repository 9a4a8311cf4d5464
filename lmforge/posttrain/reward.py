"""`lmforge reward`: a reward model = the transformer + a scalar head on the last response token's hidden state.

Trained on preference pairs with the Bradley-Terry loss -log sigma(r_w - r_l - m) (InstructGPT eq. 1; the
margin m is LLaMA 2's eq. 2). The result is a model directory (the backbone, with any LoRA merged in)
plus `reward_head.safetensors`, so the backbone still loads anywhere a model does and
`load_reward_model` gets the scorer back for PPO, best-of-N and rejection sampling.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.core.config import option, require
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.data.formats import Message
from lmforge.model.io import load_model, load_weights, save_model
from lmforge.model.transformer import Transformer
from lmforge.peft.lora import merge_lora
from lmforge.posttrain.losses import reward_accuracy, reward_pair_loss
from lmforge.posttrain.models import copy_tokenizer, device_of, pad_id_of, scalar_head
from lmforge.posttrain.pairs import EncodedPair, PairBatches, PairStageConfig, load_pairs, score_pairs
from lmforge.posttrain.stage import Stage, run_dir_option, summary, train_option
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import encode_prompt_response, pad_batch
from lmforge.train.config import TrainConfig

HEAD_NAME = "reward_head.safetensors"


class RewardModel(nn.Module):
    """A Transformer backbone and a linear head d_model -> 1 read at each sequence's last real token."""

    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = backbone.cfg  # train_loop checkpoints need it
        self.head = scalar_head(backbone.cfg.d_model, std=1.0 / math.sqrt(backbone.cfg.d_model + 1))
        self.unused_parameters = True  # the backbone's LM head gets no gradient (DDP must not wait for it)

    def score(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """Rewards [B] of right-padded `input_ids` [B, T] whose rows hold `lengths` real tokens."""
        h = self.backbone(input_ids, return_hidden=True)
        last = h[torch.arange(len(input_ids), device=h.device), lengths.to(h.device) - 1]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()

    forward = score

    def head_state(self) -> dict[str, Tensor]:
        """The tensors `save_reward_model` writes beside the backbone."""
        return {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}

    def load_head_state(self, state: dict[str, Tensor]) -> None:
        self.head.load_state_dict({k: state[k] for k in ("weight", "bias")})


def last_lengths(labels: Tensor) -> Tensor:
    """Real length of each right-padded row = index of its last labelled (response) position + 1."""
    idx = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return torch.where(labels != IGNORE_INDEX, idx, torch.full_like(idx, -1)).max(1).values + 1


def save_reward_model(rm: RewardModel, directory: str | Path) -> Path:
    directory = Path(directory)
    save_model(rm.backbone, directory, extra={"reward_head": HEAD_NAME})
    head = rm.head_state()
    atomic_write(directory / HEAD_NAME, lambda tmp: save_file(head, tmp, metadata={"format": "pt"}))
    return directory


def load_reward_model(directory: str | Path, device: str | torch.device = "cpu",
                      build: Callable[[Transformer, dict[str, Tensor]], RewardModel] | None = None) -> RewardModel:
    """A directory `lmforge reward` (or `lmforge prm`) wrote (model files + reward_head.safetensors), in eval
    mode; `build` makes the model from the backbone and the head file's tensors (default: a `RewardModel`)."""
    directory = Path(directory)
    if not (directory / HEAD_NAME).is_file():
        raise LmforgeError(f"{directory}: not a reward model (no {HEAD_NAME}); train one with `lmforge reward`")
    state = load_weights(directory / HEAD_NAME)
    backbone = load_model(directory)
    rm = build(backbone, state) if build else RewardModel(backbone)
    want = rm.head_state()
    if set(state) != set(want) or any(state[k].shape != v.shape for k, v in want.items()):
        raise LmforgeError(f"{directory / HEAD_NAME}: expected the tensors " + ", ".join(
            f"{k} {list(v.shape)}" for k, v in want.items()) + f", found {sorted(state)}")
    rm.load_head_state(state)
    return rm.to(device).eval()


@torch.no_grad()
def score_texts(rm: RewardModel, tokenizer: Tokenizer, prompts: list[list[Message]], responses: list[str],
                max_len: int | None = None, batch_size: int = 32) -> list[float]:
    """Reward of each (prompt, response): the chat-templated conversation scored at its last token."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_len = max_len or rm.cfg.max_seq_len
    device, out = device_of(rm), []
    for i in range(0, len(prompts), batch_size):
        enc = [encode_prompt_response(tokenizer, p, r, max_len)
               for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        ids, _ = pad_batch(enc, pad_id_of(tokenizer))
        lengths = torch.tensor([len(e.input_ids) for e in enc])
        out += rm.score(ids.to(device), lengths).tolist()
    return out


# ----------------------------------------------------------------------------------------------
# training


@dataclass
class RewardConfig(PairStageConfig):
    run_dir: str = run_dir_option("runs/reward", "config.json, checkpoints, metrics and RUN/model (backbone + "
                                                 "reward_head.safetensors)")
    train: TrainConfig = train_option(steps=300, lr=3e-4, warmup_steps=10, weight_decay=0.0, log_every=10,
                                      eval_every=100, save_every=0, plot_every=0)
    margin: float = option(0.0, "Bradley-Terry margin m in -log sigma(r_w - r_l - m) (LLaMA 2 eq. 2) for pairs "
                                "without a rating; 0 = none")
    rating_margin: float = option(1.0, "pairs with a 'rating' get m(r) = rating_margin x their level (significantly "
                                       "better 1, better 2/3, slightly better 1/3, negligibly better 0): 1 is LLaMA "
                                       "2's small margin, 3 its large one; 0 ignores ratings")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.peft.method in ("none", "lora"), "peft.method", self.peft.method,
                "none or lora for the reward model")
        require(self.rating_margin >= 0, "rating_margin", self.rating_margin, ">= 0")


def pair_margins(pairs: list[EncodedPair], margin: float, rating_margin: float) -> Tensor | None:
    """Per-pair margins [N]: rating_margin x rating for rated pairs, `margin` for the rest; None when all are 0."""
    out = torch.tensor([margin if p.rating is None or not rating_margin else rating_margin * p.rating
                        for p in pairs])
    return out if bool(out.any()) else None


def pair_rewards(rm: RewardModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) rewards [B] of a `collate_pairs` batch (chosen rows first)."""
    r = rm(batch["input_ids"], last_lengths(batch["labels"]))  # forward, not .score: DDP/FSDP hook the call
    return r.chunk(2)


def evaluate_pairs(rm: RewardModel, pairs: list[EncodedPair], pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """Held-out accuracy (chosen scored strictly higher) and mean margin r_w - r_l."""
    scores = score_pairs(rm, lambda ids, labels: pair_rewards(rm, {"input_ids": ids, "labels": labels}), pairs,
                         pad_id, batch_size)
    c, r = scores[:, 0].contiguous(), scores[:, 1].contiguous()
    return {"heldout_accuracy": reward_accuracy(c, r), "heldout_margin": (c - r).mean().item()}


def run_reward(cfg: RewardConfig) -> dict[str, Any]:
    """Train a reward model; returns held-out accuracy before (untrained head) and after, and the output dir."""
    with Stage("reward", cfg) as stage:
        stage.check_divides(cfg.batch_size, "batch_size")
        train_enc, held_enc = load_pairs(cfg, stage.tokenizer)
        pad_id = stage.pad_id
        torch.manual_seed(cfg.seed)
        stage.add_peft()
        rm = RewardModel(stage.policy).to(stage.device)
        stage.open()
        before = evaluate_pairs(rm, held_enc, pad_id)
        margins = pair_margins(train_enc, cfg.margin, cfg.rating_margin)

        def loss_fn(model: RewardModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
            c, r = pair_rewards(model, batch)
            loss = reward_pair_loss(c, r, batch["margin"].to(c) if "margin" in batch else None).mean()
            return loss, {"accuracy": reward_accuracy(c.detach(), r.detach()), "margin": (c - r).mean().item()}

        print(f"reward: {len(train_enc)} training pairs, {len(held_enc)} held out; held-out accuracy before "
              f"training {before['heldout_accuracy']:.3f}", file=sys.stderr)
        rated = sum(p.rating is not None for p in train_enc)
        if rated and cfg.rating_margin:
            print(f"reward: {rated} of {len(train_enc)} training pairs carry a rating: margin {cfg.rating_margin:g} "
                  "x rating level", file=sys.stderr)
        batches = PairBatches(train_enc, cfg.batch_size, pad_id, seed=cfg.seed,
                              extra=None if margins is None else {"margin": margins})
        result = stage.fit(rm, loss_fn, batches, lambda m: evaluate_pairs(m, held_enc, pad_id), wrap=RewardModel)
        model_dir = stage.run_dir / "model"
        if stage.is_main:
            rm = stage.trained
            if cfg.peft.method == "lora":
                merge_lora(rm.backbone)
            save_reward_model(rm, model_dir)
            copy_tokenizer(cfg.checkpoint, model_dir)
        stage.sync()
        out = summary(result, model_dir, heldout_accuracy_before=before["heldout_accuracy"],
                      heldout_accuracy=result.get("heldout_accuracy"), heldout_margin=result.get("heldout_margin"))
        print(f"reward: held-out accuracy {out['heldout_accuracy_before']:.3f} -> {out['heldout_accuracy']:.3f} "
              f"-> {model_dir}")
        return out
