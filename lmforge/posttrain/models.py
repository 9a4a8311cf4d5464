"""Loading and saving the models a preference/RL stage works with: policy, frozen reference, result."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from torch import nn

from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write
from lmforge.core.runtime import resolve_device
from lmforge.model.io import load_model
from lmforge.model.transformer import Transformer
from lmforge.peft.config import PeftConfig, save_trained
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer
from lmforge.train.pretrain import TOKENIZER_FILES


def load_policy(checkpoint: str, device: str = "auto") -> tuple[Transformer, Tokenizer]:
    """The model directory and the tokenizer saved beside it (RL needs text: prompts, rewards)."""
    if not checkpoint:
        raise LmforgeError("checkpoint: give the model directory to start from (e.g. RUN/model of `lmforge sft`)")
    if not (Path(checkpoint) / TOKENIZER_FILE).is_file():
        raise LmforgeError(f"checkpoint: {checkpoint} has no {TOKENIZER_FILE} (post-training needs the tokenizer)")
    return load_model(checkpoint, device=resolve_device(device)), Tokenizer.load(checkpoint)


def load_reference(ref_checkpoint: str, policy: Transformer, tokenizer: Tokenizer) -> Transformer:
    """A frozen reference: `ref_checkpoint`, or a copy of the initial policy when empty. Its tokenizer must be
    the policy's (log-prob ratios of different vocabularies mean nothing)."""
    if not ref_checkpoint:
        ref = copy.deepcopy(policy)
    else:
        path = Path(ref_checkpoint)
        if (path / TOKENIZER_FILE).is_file() and Tokenizer.load(path).sha256 != tokenizer.sha256:
            raise LmforgeError(f"ref_checkpoint: the tokenizer in {path} differs from the policy checkpoint's; "
                               "a reference must share the policy's vocabulary")
        ref = load_model(path, device=next(policy.parameters()).device)
        if ref.cfg.vocab_size != policy.cfg.vocab_size:
            raise LmforgeError(f"ref_checkpoint: {path} has vocab_size {ref.cfg.vocab_size}, the policy "
                               f"{policy.cfg.vocab_size}")
    return freeze(ref)


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def save_result(model: Transformer, peft: PeftConfig, directory: Path, checkpoint: str) -> Path:
    """`save_trained` (adapter files under PEFT, else a full model) plus the tokenizer files of `checkpoint`."""
    save_trained(model, peft, directory)
    copy_tokenizer(checkpoint, directory)
    return directory


def copy_tokenizer(checkpoint: str, directory: Path) -> None:
    """Put the tokenizer files of `checkpoint` beside a saved model, as `pretrain` does."""
    for name in TOKENIZER_FILES:
        src = Path(checkpoint) / name
        if src.is_file():
            atomic_write(directory / name, lambda tmp, src=src: shutil.copyfile(src, tmp))


def pad_id_of(tokenizer: Tokenizer) -> int:
    """Padding id for right-padded batches (masked out of every loss, so any valid id works)."""
    for token_id in (tokenizer.pad_id, tokenizer.eos_id, 0):
        if token_id is not None:
            return token_id
    return 0


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def scalar_head(d_model: int, std: float = 0.0) -> nn.Linear:
    """A d_model -> 1 head on a policy's hidden states (a reward or a value): weights ~ N(0, std), zeros at
    std 0, bias 0. `nn.Linear` draws its own init first, so a run's random stream is the same either way."""
    head = nn.Linear(d_model, 1)
    if std > 0:
        nn.init.normal_(head.weight, std=std)
    else:
        nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head
