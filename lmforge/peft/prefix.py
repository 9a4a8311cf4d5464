"""Prefix tuning (Li & Liang, 2021) and P-tuning v2 (Liu et al., 2022): trainable keys and values that every
attention layer sees in front of the sequence.

Each layer gets n extra key/value positions (`Transformer.virtual_tokens.layer_kv`); only they train.
Prefix tuning reparameterizes them during training, P = MLP(P') with a small P' [n, d] (Li & Liang,
sec. 4.3: optimizing P directly is unstable), and folds the MLP away when saved: the files hold the
plain per-layer prefixes. P-tuning v2 is the same deep prompt without the MLP, trained directly; its
prefixes start as the keys and values of n real vocabulary tokens (Li & Liang, sec. 7.2: init from real
words' activations beats random). Files are PEFT's PREFIX_TUNING: `prompt_embeddings` [n, layers * 2 *
kv_heads * head_dim], row layout (layer, key|value, kv head, dim), which `PeftModel` reads as a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.core.config import option, require
from lmforge.core.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.io import load_weights
from lmforge.model.transformer import Transformer
from lmforge.peft.io import ADAPTER_WEIGHTS_NAME, read_adapter_config, require_fields, write_adapter_dir

PEFT_KEY = "prompt_embeddings"


@dataclass
class PrefixConfig:
    n_tokens: int = option(20, "prefix length: key/value positions added to every layer")
    projection: bool = option(True, "train through a reparameterization MLP (prefix tuning); false trains the "
                                    "prefixes directly (P-tuning v2; method = ptuning_v2 forces false)")
    hidden: int = option(512, "hidden width of the reparameterization MLP")

    def __post_init__(self) -> None:
        require(self.n_tokens > 0, "prefix.n_tokens", self.n_tokens, "positive")
        require(self.hidden > 0, "prefix.hidden", self.hidden, "positive")


def prefix_width(cfg: ModelConfig) -> int:
    return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim


class Prefix(nn.Module):
    """The `virtual_tokens` of prefix tuning: per-layer keys/values, no input embeddings."""

    def __init__(self, model_cfg: ModelConfig, n_tokens: int, projection: bool, hidden: int = 512,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.n_layers, self.kv_heads, self.head_dim = model_cfg.n_layers, model_cfg.n_kv_heads, model_cfg.head_dim
        width = prefix_width(model_cfg)
        kw = {"device": device, "dtype": dtype}
        if projection:
            self.embedding = nn.Embedding(n_tokens, model_cfg.d_model, **kw)
            self.transform: nn.Module | None = nn.Sequential(nn.Linear(model_cfg.d_model, hidden, **kw), nn.Tanh(),
                                                             nn.Linear(hidden, width, **kw))
        else:
            self.embedding = nn.Embedding(n_tokens, width, **kw)
            self.transform = None

    @property
    def n_tokens(self) -> int:
        return self.embedding.weight.shape[0]

    def table(self) -> torch.Tensor:
        """[n, layers * 2 * kv_heads * head_dim]: the prefixes, through the MLP when there is one."""
        w = self.embedding.weight
        return w if self.transform is None else self.transform(w)

    def layer_kv(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (keys, values) [B, kv_heads, n, head_dim]; the MLP runs once for all layers."""
        t = self.table().view(self.n_tokens, 2 * self.n_layers, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return [(t[2 * i].expand(batch_size, -1, -1, -1), t[2 * i + 1].expand(batch_size, -1, -1, -1))
                for i in range(self.n_layers)]

    def embeddings(self, batch_size: int) -> None:
        return None

    @torch.no_grad()
    def fold(self) -> None:
        """Replace embedding + MLP by their output: the same prefixes, no reparameterization left."""
        if self.transform is None:
            return
        table = self.table()
        self.embedding = nn.Embedding(*table.shape, device=table.device, dtype=table.dtype)
        self.embedding.weight.copy_(table)
        self.transform = None

    @torch.no_grad()
    def init_from_tokens(self, model: Transformer, token_ids: torch.Tensor) -> None:
        """Set direct prefixes to the keys/values `model` computes for `token_ids` (n real tokens)."""
        if self.transform is not None:
            raise ValueError("only direct prefixes (no MLP) can start from token activations")
        cache = model.new_cache(1, self.n_tokens)
        model(token_ids[None].to(self.embedding.weight.device), cache=cache, start_pos=0)
        # cache.k: [layers, 1, kv_heads, n, dim] -> table [n, layers, 2, kv_heads, dim]
        kv = torch.stack([cache.k[:, 0], cache.v[:, 0]], dim=1).permute(3, 0, 1, 2, 4)
        self.embedding.weight.copy_(kv.reshape(self.n_tokens, -1))


def apply_prefix_tuning(model: Transformer, cfg: PrefixConfig, projection: bool | None = None) -> Transformer:
    """Freeze the base and add trainable per-layer prefixes; `projection` overrides `cfg.projection`."""
    if model.virtual_tokens is not None:
        raise LmforgeError("the model already has virtual tokens (prompt or prefix tuning)")
    projection = cfg.projection if projection is None else projection
    ref = model.embed.weight
    prefix = Prefix(model.cfg, cfg.n_tokens, projection, cfg.hidden, device=ref.device, dtype=ref.dtype)
    if not projection:
        was_training = model.training
        prefix.init_from_tokens(model.eval(), torch.randint(0, model.cfg.vocab_size, (cfg.n_tokens,)))
        model.train(was_training)
    for p in model.parameters():
        p.requires_grad_(False)
    model.virtual_tokens = prefix
    return model


def peft_config(model: Transformer) -> dict[str, Any]:
    c = model.cfg
    return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
            "num_virtual_tokens": model.virtual_tokens.n_tokens, "token_dim": c.n_kv_heads * c.head_dim,
            "num_attention_heads": c.n_kv_heads, "num_layers": c.n_layers, "num_transformer_submodules": 1,
            # the MLP is folded into the saved prefixes, so PEFT must read them as plain prefixes
            "prefix_projection": False, "encoder_hidden_size": c.d_model, "inference_mode": True}


def save_prefix(model: Transformer, directory: str | Path) -> Path:
    """Write the folded prefixes as a PEFT PREFIX_TUNING directory (the model itself keeps its MLP)."""
    if not isinstance(model.virtual_tokens, Prefix):
        raise LmforgeError("the model has no prefix to save")
    with torch.no_grad():
        table = model.virtual_tokens.table()
    return write_adapter_dir(directory, {PEFT_KEY: table}, peft_config(model))


def load_prefix(model: Transformer, directory: str | Path) -> int:
    """Add the PEFT PREFIX_TUNING prefixes in `directory` to `model`; returns the prefix length."""
    data, source = read_adapter_config(directory)
    require_fields(data, ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads"), source)
    c = model.cfg
    expected = {"num_layers": c.n_layers, "token_dim": c.n_kv_heads * c.head_dim,
                "num_attention_heads": c.n_kv_heads, "num_transformer_submodules": 1}
    for key, value in expected.items():
        if data.get(key, 1) != value:
            raise LmforgeError(f"{source}: {key}={data.get(key)!r}, but this model needs {value}")
    weights = Path(directory) / ADAPTER_WEIGHTS_NAME
    state = load_weights(weights)
    n = data["num_virtual_tokens"]
    shape = (n, prefix_width(c))
    if set(state) != {PEFT_KEY} or tuple(state[PEFT_KEY].shape) != shape:
        got = {k: tuple(v.shape) for k, v in state.items()}
        raise LmforgeError(f"{weights}: expected one tensor '{PEFT_KEY}' of shape {shape}, got {got}")
    if model.virtual_tokens is not None:
        raise LmforgeError("the model already has virtual tokens (prompt or prefix tuning)")
    ref = model.embed.weight
    prefix = Prefix(c, n, projection=False, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        prefix.embedding.weight.copy_(state[PEFT_KEY])
    model.virtual_tokens = prefix
    return n
