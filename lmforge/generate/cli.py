"""`lmforge generate`: text (or token ids) in, streamed text (or one JSON object) out."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lmforge.config import option
from lmforge.errors import LmforgeError
from lmforge.generate.engine import generate_stream
from lmforge.generate.sampling import SamplingParams
from lmforge.model import load_model
from lmforge.runtime import resolve_device
from lmforge.tokenizer import TOKENIZER_FILE, StreamDecoder, Tokenizer


@dataclass
class GenerateConfig:
    checkpoint: str = option(help="model directory (config.json + model.safetensors [+ tokenizer.json])")
    adapter: str = option("", "adapter directory to run on the checkpoint: HF PEFT LoRA/DoRA, prefix or prompt "
                              "tuning, or an lmforge bottleneck adapter")
    prompt: str = option("", "text to continue; empty starts from the tokenizer's bos token")
    input_ids: str = option("", "token ids to continue instead of text, e.g. \"1 2 3\" (no tokenizer needed)")
    greedy: bool = option(False, "always take the most likely token")
    temperature: float = option(0.8, "sampling temperature; <= 0 means greedy")
    top_k: int = option(0, "sample among the k most likely tokens; 0 keeps all")
    top_p: float = option(1.0, "nucleus sampling mass; 1 keeps all")
    max_new_tokens: int = option(100, "most tokens to generate")
    seed: int = option(0, "seed of the sampling generator (same seed, same text)")
    json: bool = option(False, "print one JSON object {\"ids\": [new ids], \"text\": new text} "
                               "instead of streaming")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")


def parse_input_ids(text: str) -> list[int]:
    """'1 2 3' (or '1,2,3') -> [1, 2, 3]; anything else is a one-line user error."""
    ids = []
    for part in text.replace(",", " ").split():
        try:
            ids.append(int(part))
        except ValueError:
            raise LmforgeError(f"--input-ids: '{part}' is not an integer token id") from None
    return ids


def load_tokenizer(checkpoint: Path) -> Tokenizer | None:
    """The tokenizer saved beside the weights, or None when the directory has none."""
    return Tokenizer.load(checkpoint) if (checkpoint / TOKENIZER_FILE).is_file() else None


def prompt_ids(cfg: GenerateConfig, tokenizer: Tokenizer | None) -> list[int]:
    if cfg.input_ids.strip() and cfg.prompt:
        raise LmforgeError("give --prompt or --input-ids, not both")
    if cfg.input_ids.strip():
        return parse_input_ids(cfg.input_ids)
    if tokenizer is None:
        raise LmforgeError(f"{cfg.checkpoint} has no {TOKENIZER_FILE}: pass token ids with --input-ids")
    ids = tokenizer.encode(cfg.prompt, add_bos=tokenizer.bos_id is not None) if cfg.prompt else []
    if not ids:
        if tokenizer.bos_id is None:
            raise LmforgeError("the prompt is empty and the tokenizer has no bos token to start from: "
                               "give --prompt or --input-ids")
        ids = [tokenizer.bos_id]
    return ids


def sampling_params(cfg: GenerateConfig, tokenizer: Tokenizer | None) -> SamplingParams:
    eos = tokenizer.eos_id if tokenizer is not None else None
    return SamplingParams(greedy=cfg.greedy, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                          max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                          stop_token_ids=[] if eos is None else [eos])


def generate_cmd(cfg: GenerateConfig) -> int:
    checkpoint = Path(cfg.checkpoint)
    model = load_model(checkpoint, device=resolve_device(cfg.device))
    if cfg.adapter:
        from lmforge.peft.config import load_any_adapter

        load_any_adapter(model, cfg.adapter)
    tokenizer = load_tokenizer(checkpoint)
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise LmforgeError(f"{checkpoint / TOKENIZER_FILE}: tokenizer has {tokenizer.vocab_size} tokens but "
                           f"the model's vocab_size is {model.cfg.vocab_size}")
    ids = prompt_ids(cfg, tokenizer)
    params = sampling_params(cfg, tokenizer)
    stream = generate_stream(model, ids, params)
    if cfg.json:
        new_ids = list(tqdm(stream, total=params.max_new_tokens, desc="generate", unit="tok", disable=None,
                            file=sys.stderr))
        text = tokenizer.decode(new_ids) if tokenizer is not None else None
        print(json.dumps({"ids": new_ids, "text": text}))
        return 0
    stream_to_terminal(stream, ids, cfg.prompt, tokenizer)
    return 0


def stream_to_terminal(stream: Iterator[int], prompt: list[int], prompt_text: str,
                       tokenizer: Tokenizer | None) -> None:
    """Print the prompt, then each piece of text (or each id, without a tokenizer) as it arrives."""
    out = sys.stdout
    if tokenizer is None:
        out.write(" ".join(map(str, prompt)))
        for token in stream:
            out.write(f" {token}")
            out.flush()
    else:
        out.write(prompt_text or tokenizer.decode(prompt))
        out.flush()
        decoder = StreamDecoder(tokenizer)
        for token in stream:
            out.write(decoder.push(token))
            out.flush()
        out.write(decoder.flush())
    out.write("\n")
    out.flush()
