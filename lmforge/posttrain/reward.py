"""`lmforge reward`: a reward model = the transformer + a scalar head on the last response token's hidden state.

Trained on preference pairs with the Bradley-Terry loss -log sigma(r_w - r_l - m) (InstructGPT eq. 1; the
margin m is LLaMA 2's eq. 2). The result is a model directory (the backbone, with any LoRA merged in)
plus `reward_head.safetensors`, so the backbone still loads anywhere a model does and
`load_reward_model` gets the scorer back for PPO, best-of-N and rejection sampling.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.core.config import option, save_config
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.files import atomic_write
from lmforge.core.tensors import IGNORE_INDEX
from lmforge.data.formats import Message
from lmforge.model.io import load_model, load_weights, save_model
from lmforge.model.transformer import Transformer
from lmforge.peft.config import PeftConfig, apply_peft
from lmforge.peft.lora import merge_lora
from lmforge.posttrain.losses import reward_accuracy, reward_pair_loss
from lmforge.posttrain.models import copy_tokenizer, device_of, load_policy, pad_id_of
from lmforge.posttrain.pairs import EncodedPair, PairBatches, collate_pairs, encode_pairs, train_heldout_pairs
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import encode_prompt_response, pad_batch
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import train_loop

HEAD_NAME = "reward_head.safetensors"


class RewardModel(nn.Module):
    """A Transformer backbone and a linear head d_model -> 1 read at each sequence's last real token."""

    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = backbone.cfg  # train_loop checkpoints need it
        self.head = nn.Linear(backbone.cfg.d_model, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(backbone.cfg.d_model + 1))
        nn.init.zeros_(self.head.bias)

    def score(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """Rewards [B] of right-padded `input_ids` [B, T] whose rows hold `lengths` real tokens."""
        h = self.backbone(input_ids, return_hidden=True)
        last = h[torch.arange(len(input_ids), device=h.device), lengths.to(h.device) - 1]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()

    forward = score


def last_lengths(labels: Tensor) -> Tensor:
    """Real length of each right-padded row = index of its last labelled (response) position + 1."""
    idx = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return torch.where(labels != IGNORE_INDEX, idx, torch.full_like(idx, -1)).max(1).values + 1


def save_reward_model(rm: RewardModel, directory: str | Path) -> Path:
    directory = Path(directory)
    save_model(rm.backbone, directory, extra={"reward_head": HEAD_NAME})
    head = {k: v.detach().contiguous() for k, v in rm.head.state_dict().items()}
    atomic_write(directory / HEAD_NAME, lambda tmp: save_file(head, tmp, metadata={"format": "pt"}))
    return directory


def load_reward_model(directory: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    """A directory `lmforge reward` wrote (model files + reward_head.safetensors), in eval mode."""
    directory = Path(directory)
    if not (directory / HEAD_NAME).is_file():
        raise LmforgeError(f"{directory}: not a reward model (no {HEAD_NAME}); train one with `lmforge reward`")
    rm = RewardModel(load_model(directory))
    state = load_weights(directory / HEAD_NAME)
    if set(state) != {"weight", "bias"} or state["weight"].shape != rm.head.weight.shape:
        raise LmforgeError(f"{directory / HEAD_NAME}: expected a [1, {rm.cfg.d_model}] head weight and a bias")
    rm.head.load_state_dict(state)
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


def _reward_train() -> TrainConfig:
    return TrainConfig(steps=300, lr=3e-4, warmup_steps=10, weight_decay=0.0, log_every=10, eval_every=100,
                       save_every=0, plot_every=0)


@dataclass
class RewardConfig:
    checkpoint: str = option("", "model directory to start from (with tokenizer.json), e.g. an SFT result")
    data: str = option("", "preference JSONL/JSON (hh-rlhf, shp, pku, se, plain); empty = synthetic task pairs")
    format: str = option("auto", "preference format of `data` (auto detects it per record)")
    synthetic_pairs: int = option(1200, "training pairs drawn from the task suite when `data` is empty")
    heldout: float = option(0.1, "fraction of pairs held out for accuracy")
    margin: float = option(0.0, "Bradley-Terry margin m in -log sigma(r_w - r_l - m) (LLaMA 2 eq. 2); 0 = none")
    max_len: int = option(128, "tokens per sequence; longer pairs are truncated (counted warning)")
    batch_size: int = option(16, "pairs per micro-batch")
    seed: int = option(0, "seed of the data split, order and head init")
    run_dir: str = option("runs/reward", "checkpoints, metrics and RUN/model (backbone + reward_head.safetensors)")
    resume: bool = option(False, "continue from RUN/checkpoints/latest")
    train: TrainConfig = field(default_factory=_reward_train, metadata={"help": "optimization"})
    peft: PeftConfig = field(default_factory=PeftConfig, metadata={"help": "parameter-efficient fine-tuning"})

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_len < 2:
            raise ConfigError("batch_size must be >= 1 and max_len >= 2")
        if self.peft.method not in ("none", "lora"):
            raise ConfigError(f"peft.method: the reward model supports none or lora, got {self.peft.method!r}")


def pair_rewards(rm: RewardModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) rewards [B] of a `collate_pairs` batch (chosen rows first)."""
    r = rm.score(batch["input_ids"], last_lengths(batch["labels"]))
    return r.chunk(2)


@torch.no_grad()
def evaluate_pairs(rm: RewardModel, pairs: list[EncodedPair], pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """Held-out accuracy (chosen scored strictly higher) and mean margin r_w - r_l."""
    was_training = rm.training
    rm.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        ids, labels = collate_pairs(pairs[i:i + batch_size], pad_id)
        c, r = pair_rewards(rm, {"input_ids": ids.to(device_of(rm)), "labels": labels.to(device_of(rm))})
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    rm.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"heldout_accuracy": reward_accuracy(c, r), "heldout_margin": (c - r).mean().item()}


def run_reward(cfg: RewardConfig) -> dict[str, Any]:
    """Train a reward model; returns held-out accuracy before (untrained head) and after, and the output dir."""
    backbone, tokenizer = load_policy(cfg.checkpoint, cfg.train.device)
    train_pairs, held_pairs = train_heldout_pairs(cfg.data, cfg.format, cfg.synthetic_pairs, cfg.heldout, cfg.seed)
    train_enc = encode_pairs(tokenizer, train_pairs, cfg.max_len)
    held_enc = encode_pairs(tokenizer, held_pairs, cfg.max_len)
    pad_id = pad_id_of(tokenizer)
    torch.manual_seed(cfg.seed)
    apply_peft(backbone, cfg.peft)
    rm = RewardModel(backbone).to(device_of(backbone))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    before = evaluate_pairs(rm, held_enc, pad_id)
    margin = torch.tensor(cfg.margin) if cfg.margin else None

    def loss_fn(model: RewardModel, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        c, r = pair_rewards(model, batch)
        loss = reward_pair_loss(c, r, None if margin is None else margin.to(c.device)).mean()
        return loss, {"accuracy": reward_accuracy(c.detach(), r.detach()), "margin": (c - r).mean().item()}

    print(f"reward: {len(train_enc)} training pairs, {len(held_enc)} held out; held-out accuracy before "
          f"training {before['heldout_accuracy']:.3f}", file=sys.stderr)
    batches = PairBatches(train_enc, cfg.batch_size, pad_id, seed=cfg.seed)
    result = train_loop(rm, loss_fn, batches, cfg.train, run_dir, resume=cfg.resume, desc="reward",
                        evaluate=lambda m: evaluate_pairs(m, held_enc, pad_id))
    if cfg.peft.method == "lora":
        merge_lora(rm.backbone)
    model_dir = save_reward_model(rm, run_dir / "model")
    copy_tokenizer(cfg.checkpoint, model_dir)
    out = {"heldout_accuracy_before": before["heldout_accuracy"],
           "heldout_accuracy": result.get("heldout_accuracy"), "heldout_margin": result.get("heldout_margin"),
           "final_loss": result["final_loss"], "steps": result["steps"], "model_dir": str(model_dir)}
    print(f"reward: held-out accuracy {out['heldout_accuracy_before']:.3f} -> {out['heldout_accuracy']:.3f} "
          f"-> {model_dir}")
    return out

