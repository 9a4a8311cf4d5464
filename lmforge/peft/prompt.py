"""Prompt tuning (Lester et al., 2021): n trainable input embeddings prepended to every sequence.

Only the soft prompt [n, d] trains. It is initialized from the embeddings of real vocabulary tokens:
the tokens of `init_text`, repeated or cut to n (the paper's sec. 3 finds vocabulary init better than
random), or n random token ids when no text is given. The model carries it as `virtual_tokens`
(`lmforge.model.transformer`), so forward signatures, output shapes and KV-cache generation are
unchanged. Files are PEFT's PROMPT_TUNING: tensor `prompt_embeddings` [n, d].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.core.config import option, require
from lmforge.core.errors import LmforgeError
from lmforge.model.io import load_weights
from lmforge.model.transformer import Transformer
from lmforge.peft.io import ADAPTER_WEIGHTS_NAME, read_adapter_config, require_fields, write_adapter_dir
from lmforge.tokenizer import Tokenizer

PEFT_KEY = "prompt_embeddings"


@dataclass
class PromptConfig:
    n_tokens: int = option(20, "virtual tokens prepended to every sequence")
    init_text: str = option("", "text whose token embeddings initialize the prompt (repeated or cut to "
                                "n_tokens); empty: embeddings of random vocabulary tokens")
    tokenizer: str = option("", "directory holding tokenizer.json (or the file) to encode init_text with")

    def __post_init__(self) -> None:
        require(self.n_tokens > 0, "prompt.n_tokens", self.n_tokens, "positive")
        require(not self.init_text or bool(self.tokenizer), "prompt.tokenizer", self.tokenizer,
                "the directory holding tokenizer.json when prompt.init_text is given")


class SoftPrompt(nn.Module):
    """The `virtual_tokens` of prompt tuning: input embeddings only, no per-layer keys/values."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    @property
    def n_tokens(self) -> int:
        return self.weight.shape[0]

    def embeddings(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)

    def layer_kv(self, batch_size: int) -> None:
        return None


def init_token_ids(text_ids: list[int], n: int) -> list[int]:
    """The text's ids repeated until there are n, then cut to n (PEFT's TEXT init does the same)."""
    if not text_ids:
        raise LmforgeError("prompt.init_text encodes to no tokens")
    return (text_ids * math.ceil(n / len(text_ids)))[:n]


def apply_prompt_tuning(model: Transformer, cfg: PromptConfig, text_ids: list[int] | None = None) -> Transformer:
    """Freeze the base and prepend a trainable soft prompt. `text_ids` (already encoded init text)
    overrides `cfg.init_text`."""
    if model.virtual_tokens is not None:
        raise LmforgeError("the model already has virtual tokens (prompt or prefix tuning)")
    if text_ids is None and cfg.init_text:
        text_ids = Tokenizer.load(cfg.tokenizer).encode(cfg.init_text)
    vocab = model.cfg.vocab_size
    if text_ids is None:
        ids = torch.randint(0, vocab, (cfg.n_tokens,))
    else:
        ids = torch.tensor(init_token_ids(list(text_ids), cfg.n_tokens))
        if int(ids.max()) >= vocab:
            raise LmforgeError(f"prompt.init_text has token id {int(ids.max())}, outside the model's vocabulary")
    for p in model.parameters():
        p.requires_grad_(False)
    model.virtual_tokens = SoftPrompt(model.embed.weight[ids.to(model.embed.weight.device)].detach().clone())
    return model


def peft_config(model: Transformer) -> dict[str, Any]:
    c = model.cfg
    return {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
            "num_virtual_tokens": model.virtual_tokens.n_tokens, "token_dim": c.d_model,
            "num_transformer_submodules": 1, "num_attention_heads": c.n_heads, "num_layers": c.n_layers,
            # the weights are in the file, so PEFT must not re-run a TEXT init (it would need the tokenizer)
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
            "inference_mode": True}


def save_prompt(model: Transformer, directory: str | Path) -> Path:
    if not isinstance(model.virtual_tokens, SoftPrompt):
        raise LmforgeError("the model has no soft prompt to save")
    return write_adapter_dir(directory, {PEFT_KEY: model.virtual_tokens.weight}, peft_config(model))


def load_prompt(model: Transformer, directory: str | Path) -> int:
    """Prepend the PEFT PROMPT_TUNING soft prompt in `directory`; returns its number of virtual tokens."""
    data, source = read_adapter_config(directory)
    require_fields(data, ("num_virtual_tokens", "token_dim"), source)
    if data.get("num_transformer_submodules", 1) != 1:
        raise LmforgeError(f"{source}: num_transformer_submodules must be 1 (a decoder-only model)")
    if data["token_dim"] != model.cfg.d_model:
        raise LmforgeError(f"{source}: token_dim {data['token_dim']} is not this model's d_model {model.cfg.d_model}")
    weights = Path(directory) / ADAPTER_WEIGHTS_NAME
    state = load_weights(weights)
    n = data["num_virtual_tokens"]
    if set(state) != {PEFT_KEY} or tuple(state[PEFT_KEY].shape) != (n, model.cfg.d_model):
        got = {k: tuple(v.shape) for k, v in state.items()}
        raise LmforgeError(f"{weights}: expected one tensor '{PEFT_KEY}' of shape {(n, model.cfg.d_model)}, "
                           f"got {got}")
    if model.virtual_tokens is not None:
        raise LmforgeError("the model already has virtual tokens (prompt or prefix tuning)")
    ref = model.embed.weight
    model.virtual_tokens = SoftPrompt(state[PEFT_KEY].to(device=ref.device, dtype=ref.dtype))
    return n
