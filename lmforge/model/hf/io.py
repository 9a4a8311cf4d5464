"""Files every HF family shares: safetensors weights (sharded or not), tokenizer files, bos/eos/pad ids, and
the HF directory writer. Only safetensors are read: pickle checkpoints (`pytorch_model.bin`) can run code
when loaded and are refused.

Exported tokenizer files make transformers read sequences as lmforge does (the rule in
`lmforge.tokenizer.chat`): the chat template lmforge uses (a built-in one where the checkpoint had none), a
post-processor that starts a text with the sequence-start token where the tokenizer declares none, and
`generation_config.json` stopping at the end-of-turn token as well as at eos.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import processors
from tqdm import tqdm

from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write, atomic_write_json, atomic_write_text, read_json_object
from lmforge.model.io import CONFIG_NAME, WEIGHTS_NAME
from lmforge.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer
from lmforge.tokenizer.chat import stop_token_ids

HF_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "special_tokens_map.json", CHAT_TEMPLATE_FILE)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise LmforgeError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards named by `model.safetensors.index.json`."""
    index = hf_dir / HF_INDEX_NAME
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LmforgeError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (hf_dir / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    elif any((hf_dir / name).is_file() for name in PICKLE_NAMES):
        raise LmforgeError(f"{hf_dir}: only a pickle checkpoint (pytorch_model.bin) is there; pickle "
                           "checkpoints are refused (loading one can run code): convert it to safetensors")
    else:
        raise LmforgeError(f"{hf_dir}: no {WEIGHTS_NAME} or {HF_INDEX_NAME}")
    state: dict[str, torch.Tensor] = {}
    for name in tqdm(files, desc="reading shards", unit="shard", disable=len(files) < 2):
        path = hf_dir / name
        if not path.is_file():
            raise LmforgeError(f"{index}: names shard '{name}', which is missing")
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise LmforgeError(f"{path}: not a readable safetensors file ({e})") from None
    return state


def copy_tokenizer_files(src: Path, dst: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():
            atomic_write(dst / name, lambda tmp, name=name: shutil.copyfile(src / name, tmp))
            copied.append(name)
    return copied


def token_ids_of(checkpoint_dir: Path) -> dict[str, Any]:
    """bos/eos/pad ids `from_hf` recorded, else tokenizer_config.json's tokens found in tokenizer.json."""
    ids = read_json_object(checkpoint_dir / CONFIG_NAME).get("hf") or {}
    ids = {k: ids[k] for k in TOKEN_ID_KEYS if ids.get(k) is not None}
    tok_cfg, tok = checkpoint_dir / "tokenizer_config.json", checkpoint_dir / "tokenizer.json"
    if tok_cfg.is_file() and tok.is_file():
        vocab = {t["content"]: t["id"] for t in read_json_object(tok).get("added_tokens", [])}
        for key, value in read_json_object(tok_cfg).items():
            content = value.get("content") if isinstance(value, dict) else value
            id_key = f"{key}_id"
            if id_key in TOKEN_ID_KEYS and id_key not in ids and content in vocab:
                ids[id_key] = vocab[content]
    return ids


def write_hf_dir(hf_dir: Path, hf_state: dict[str, torch.Tensor], hf_cfg: dict[str, Any],
                 token_ids: dict[str, Any], checkpoint_dir: Path) -> Path:
    """An HF model directory: safetensors weights, config.json, generation_config.json, the tokenizer files."""
    hf_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(hf_dir / WEIGHTS_NAME, lambda tmp: save_file(hf_state, tmp, metadata={"format": "pt"}))
    atomic_write_json(hf_dir / CONFIG_NAME, hf_cfg)
    generation = {k: token_ids[k] for k in TOKEN_ID_KEYS if k in token_ids}
    if (checkpoint_dir / TOKENIZER_FILE).is_file():
        tokenizer = Tokenizer.load(checkpoint_dir)
        write_hf_tokenizer(tokenizer, checkpoint_dir, hf_dir)
        stops = generation_stop_ids(token_ids.get("eos_token_id"), tokenizer)
        if stops:
            generation["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    else:
        copy_tokenizer_files(checkpoint_dir, hf_dir)
    if generation:
        atomic_write_json(hf_dir / "generation_config.json", generation)
    return hf_dir


def generation_stop_ids(eos: int | list[int] | None, tokenizer: Tokenizer) -> list[int]:
    """The model's eos id(s), else the tokenizer's, and the end-of-turn token lmforge's chat stops at: HF
    `generate` then stops where lmforge does."""
    ids = list(eos) if isinstance(eos, list) else [] if eos is None else [eos]
    stops = stop_token_ids(tokenizer)
    if not ids:
        return stops
    return ids + [t for t in stops if t not in ids and t != tokenizer.eos_id]


def write_hf_tokenizer(tokenizer: Tokenizer, src: Path, hf_dir: Path) -> None:
    """tokenizer.json with a post-processor that starts a text with `sequence_start` (unless the tokenizer
    declares its own), and src's tokenizer_config.json with the chat template lmforge renders."""
    tk = tokenizer.tk
    start = tokenizer.sequence_start
    if start and not tokenizer.declared_start:
        tk = type(tk).from_str(tk.to_str())
        names = [(tk.id_to_token(i), i) for i in dict.fromkeys(start)]
        lead = " ".join(tk.id_to_token(i) for i in start)
        template = processors.TemplateProcessing(single=f"{lead} $A", pair=f"{lead} $A $B:1", special_tokens=names)
        kept = tk.post_processor  # e.g. ByteLevel's offset trimming stays
        tk.post_processor = template if kept is None else processors.Sequence([kept, template])
    atomic_write_text(hf_dir / TOKENIZER_FILE, tk.to_str(pretty=True))
    config = read_json_object(src / TOKENIZER_CONFIG_FILE) if (src / TOKENIZER_CONFIG_FILE).is_file() else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for role, token in tokenizer.special_tokens.items():
        config.setdefault(f"{role}_token", token)
    config["chat_template"] = tokenizer.chat_template  # also one chat_template.jinja held: one place, this one
    atomic_write_json(hf_dir / TOKENIZER_CONFIG_FILE, config)
    if (src / "special_tokens_map.json").is_file():
        copy_tokenizer_files(src, hf_dir, ("special_tokens_map.json",))
