"""`lmforge generate`: text (or token ids) in, streamed text (or one JSON object) out."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError
from lmforge.core.runtime import resolve_device
from lmforge.generate.beam import BeamParams, beam_search
from lmforge.generate.contrastive import contrastive_stream
from lmforge.generate.engine import generate_stream
from lmforge.generate.presets import apply_preset, describe_preset, preset_settings
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.speculative import DraftModel, MTPDrafter, SpecStats, check_draft, speculative_stream
from lmforge.generate.stops import stop_at_strings
from lmforge.model import load_model
from lmforge.peft.config import load_any_adapter
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer


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
    min_p: float = option(0.0, "drop tokens below min_p times the top token's probability; 0 keeps all")
    repetition_penalty: float = option(1.0, "CTRL repetition penalty on tokens in the context; 1 is off")
    frequency_penalty: float = option(0.0, "OpenAI frequency penalty (per repeat of a generated token)")
    presence_penalty: float = option(0.0, "OpenAI presence penalty (once per generated token)")
    no_repeat_ngram_size: int = option(0, "never repeat an n-gram of this size; 0 is off")
    preset: str = option("", "sampling preset: precise, balanced or creative (printed when used); options "
                             "you set yourself override it")
    num_beams: int = option(1, "beam search with this many beams when > 1 (prints the best hypothesis)")
    length_penalty: float = option(1.0, "beam search: score = sum log-probs / length ** length_penalty")
    early_stopping: Literal["false", "true", "never"] = option("false", "beam search stopping rule (as HF)")
    penalty_alpha: float = option(0.0, "contrastive search with this degeneration penalty when > 0 "
                                       "(candidates: --top-k, 4 if 0)")
    draft: str = option("", "speculative decoding: a draft model directory (same tokenizer as the checkpoint), "
                            "or 'mtp' to draft with the checkpoint's own multi-token-prediction heads")
    num_draft_tokens: int = option(4, "speculative decoding: tokens the draft proposes per round")
    compile: bool = option(False, "decode with the static-shape step under torch.compile (CUDA graphs on CUDA): "
                                  "same tokens, much faster per token on small models; the first call compiles")
    max_new_tokens: int = option(100, "most tokens to generate")
    stop: list[str] = option(default_factory=list, help="stop strings: generation ends at the first one, which "
                                                        "is not printed (needs a tokenizer)")
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


SAMPLING_FIELDS = ("greedy", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                   "presence_penalty", "no_repeat_ngram_size", "max_new_tokens", "seed")


def sampling_params(cfg: GenerateConfig, tokenizer: Tokenizer | None) -> SamplingParams:
    """The command's settings; with --preset, the preset fills every setting left at its default."""
    eos = tokenizer.eos_id if tokenizer is not None else None
    params = SamplingParams(**{k: getattr(cfg, k) for k in SAMPLING_FIELDS},
                            stop_token_ids=[] if eos is None else [eos])
    if not cfg.preset:
        return params
    defaults = GenerateConfig(checkpoint="")
    explicit = frozenset(k for k in SAMPLING_FIELDS if getattr(cfg, k) != getattr(defaults, k))
    kept = sorted(explicit & preset_settings(cfg.preset).keys())
    print(describe_preset(cfg.preset) + (f" (kept yours: {', '.join(kept)})" if kept else ""), file=sys.stderr)
    return apply_preset(params, cfg.preset, explicit)


def strategy_stream(cfg: GenerateConfig, model, ids: list[int], params: SamplingParams,
                    stats: SpecStats) -> Iterator[int]:
    """The token stream of the chosen strategy: contrastive, speculative, or plain sampling/greedy."""
    if cfg.penalty_alpha > 0:
        return contrastive_stream(model, ids, cfg.penalty_alpha, cfg.top_k or 4, params.max_new_tokens,
                                  params.stop_token_ids)
    if cfg.draft == "mtp":
        return speculative_stream(model, MTPDrafter(model), ids, params, cfg.num_draft_tokens, stats)
    if cfg.draft:
        draft = load_model(Path(cfg.draft), device=next(model.parameters()).device)
        check_draft(model, draft)
        drafter = DraftModel(draft.eval(), min(draft.context_length, model.context_length))
        return speculative_stream(model, drafter, ids, params, cfg.num_draft_tokens, stats)
    return generate_stream(model, ids, params, compile=cfg.compile)


def run_beam_search(cfg: GenerateConfig, model, ids: list[int], params: SamplingParams,
                    tokenizer: Tokenizer | None) -> None:
    early = {"true": True, "false": False, "never": "never"}[cfg.early_stopping]
    beam = BeamParams(num_beams=cfg.num_beams, length_penalty=cfg.length_penalty, early_stopping=early,
                      no_repeat_ngram_size=cfg.no_repeat_ngram_size, max_new_tokens=max(1, cfg.max_new_tokens),
                      stop_token_ids=params.stop_token_ids)
    best = beam_search(model, ids, beam)[0]
    text = tokenizer.decode(best.tokens) if tokenizer is not None else None
    if cfg.json:
        print(json.dumps({"ids": best.tokens, "text": text, "score": best.score}))
    elif text is None:
        print(" ".join(map(str, ids + best.tokens)))
    else:
        print((cfg.prompt or tokenizer.decode(ids)) + text)


def generate_cmd(cfg: GenerateConfig) -> int:
    checkpoint = Path(cfg.checkpoint)
    model = load_model(checkpoint, device=resolve_device(cfg.device))
    if cfg.adapter:
        load_any_adapter(model, cfg.adapter)
    tokenizer = load_tokenizer(checkpoint)
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise LmforgeError(f"{checkpoint / TOKENIZER_FILE}: tokenizer has {tokenizer.vocab_size} tokens but "
                           f"the model's vocab_size is {model.cfg.vocab_size}")
    ids = prompt_ids(cfg, tokenizer)
    params = sampling_params(cfg, tokenizer)
    chosen = [name for name, on in (("--num-beams", cfg.num_beams > 1), ("--penalty-alpha", cfg.penalty_alpha > 0),
                                    ("--draft", bool(cfg.draft))) if on]
    if len(chosen) > 1:
        raise LmforgeError(f"choose one decoding strategy, not {' and '.join(chosen)}")
    if cfg.num_beams > 1:
        run_beam_search(cfg, model, ids, params, tokenizer)
        return 0
    stats = SpecStats()
    stream = strategy_stream(cfg, model, ids, params, stats)
    if cfg.stop and tokenizer is None:
        raise LmforgeError("--stop needs a tokenizer (tokenizer.json in the checkpoint)")
    if cfg.json:
        bar = dict(total=params.max_new_tokens, desc="generate", unit="tok", disable=None, file=sys.stderr)
        if cfg.stop:
            pieces = list(tqdm(stop_at_strings(stream, tokenizer, cfg.stop), **bar))
            new_ids, text = [t for t, _ in pieces if t is not None], "".join(p for _, p in pieces)
        else:
            new_ids = list(tqdm(stream, **bar))
            text = tokenizer.decode(new_ids) if tokenizer is not None else None
        extra = {"acceptance_rate": stats.acceptance_rate} if cfg.draft else {}
        print(json.dumps({"ids": new_ids, "text": text, **extra}))
    else:
        stream_to_terminal(stream, ids, cfg.prompt, tokenizer, cfg.stop)
    if cfg.draft:
        print(f"speculative decoding: acceptance rate {stats.acceptance_rate:.1%} ({stats.accepted}/{stats.proposed} "
              f"draft tokens), {stats.tokens_per_target_call:.2f} tokens per target call", file=sys.stderr)
    return 0


def stream_to_terminal(stream: Iterator[int], prompt: list[int], prompt_text: str,
                       tokenizer: Tokenizer | None, stops: Sequence[str] = ()) -> None:
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
        for _, text in stop_at_strings(stream, tokenizer, stops):
            out.write(text)
            out.flush()
    out.write("\n")
    out.flush()
