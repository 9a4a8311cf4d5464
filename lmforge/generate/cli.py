"""`lmforge generate`: text (or token ids) in, streamed text (or one JSON object) out.

Parse the flags into a `Strategy`, call `lmforge.generate.engine.generate_stream`, print: the decoding
itself lives in the library, where chat, eval and the quickstart use it too.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn
from tqdm import tqdm

from lmforge.core.config import option, require
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.runtime import resolve_device
from lmforge.generate.chat import ThinkShown
from lmforge.generate.engine import Kind, RunStats, Strategy, generate_stream
from lmforge.generate.presets import apply_preset, describe_preset, preset_settings
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.stops import stop_at_strings
from lmforge.model import load_model
from lmforge.model.quant import QUANTIZE_HELP, Quantize, apply_quantize
from lmforge.peft.config import load_any_adapter
from lmforge.tasks.reasoning import split_reasoning
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer


def _sampling() -> SamplingParams:
    """`SamplingParams`' own defaults, the ones chat and the server's API use too (temperature 1, 64 tokens)."""
    return SamplingParams()


@dataclass
class GenerateConfig:
    checkpoint: str = option(help="model directory (config.json + model.safetensors [+ tokenizer.json])")
    adapter: str = option("", "adapter directory to run on the checkpoint: HF PEFT LoRA/DoRA, prefix or prompt "
                              "tuning, or an lmforge bottleneck adapter")
    prompt: str = option("", "text to continue, after the sequence start (eos, or the tokenizer's declared bos)")
    input_ids: str = option("", "token ids to continue instead of text, e.g. \"1 2 3\" (no tokenizer needed)")
    sampling: SamplingParams = option(default_factory=_sampling, help="how tokens are chosen (every strategy "
                                                                      "reads max_new_tokens and seed from it)")
    preset: str = option("", "sampling preset: precise, balanced or creative (printed when used); options "
                             "you set yourself override it")
    num_beams: int = option(1, "beam search with this many beams when > 1 (prints the best hypothesis)")
    length_penalty: float = option(1.0, "beam search: score = sum log-probs / length ** length_penalty")
    early_stopping: Literal["false", "true", "never"] = option("false", "beam search stopping rule (as HF)")
    penalty_alpha: float = option(0.0, "contrastive search with this degeneration penalty when > 0 "
                                       "(candidates: --sampling.top-k, 4 if 0)")
    draft: str = option("", "speculative decoding: a draft model directory (same tokenizer as the checkpoint), "
                            "or 'mtp' to draft with the checkpoint's own multi-token-prediction heads")
    num_draft_tokens: int = option(4, "speculative decoding: tokens the draft proposes per round")
    compile: bool = option(False, "decode with the static-shape step under torch.compile (CUDA graphs on CUDA, "
                                  "inductor on CPU): same tokens, faster per token on small models; the first "
                                  "call compiles (a minute or more on CPU)")
    stop: list[str] = option(default_factory=list, help="stop strings: generation ends at the first one, which "
                                                        "is not printed (needs a tokenizer)")
    json: bool = option(False, "print one JSON object {\"ids\": [new ids], \"text\": new text} "
                               "instead of streaming")
    quantize: Quantize = option("none", QUANTIZE_HELP)
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")

    def __post_init__(self) -> None:
        require(self.num_beams >= 1, "num_beams", self.num_beams, ">= 1")
        require(0.0 <= self.penalty_alpha <= 1.0, "penalty_alpha", self.penalty_alpha, "in [0, 1]")
        require(self.num_draft_tokens >= 1, "num_draft_tokens", self.num_draft_tokens, ">= 1")
        on = {"--num-beams": self.num_beams > 1, "--penalty-alpha": self.penalty_alpha > 0, "--draft": bool(self.draft)}
        chosen = [name for name, chose in on.items() if chose]
        if len(chosen) > 1:
            raise ConfigError(f"choose one decoding strategy, not {' and '.join(chosen)}")

    @property
    def kind(self) -> Kind:
        if self.num_beams > 1:
            return "beam"
        if self.penalty_alpha > 0:
            return "contrastive"
        return "speculative" if self.draft else "sample"


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
    ids = tokenizer.sequence_start + tokenizer.encode(cfg.prompt)  # a document start (lmforge.tokenizer.chat)
    if not ids:
        raise LmforgeError("the prompt is empty and the tokenizer has no bos or eos token to start from: "
                           "give --prompt or --input-ids")
    return ids


def sampling_params(cfg: GenerateConfig, tokenizer: Tokenizer | None) -> SamplingParams:
    """The command's settings, stopping at eos; with --preset, the preset fills every setting left at its
    default."""
    eos = [] if tokenizer is None or tokenizer.eos_id is None else [tokenizer.eos_id]
    params = dataclasses.replace(cfg.sampling, stop_token_ids=[*cfg.sampling.stop_token_ids, *eos])
    if not cfg.preset:
        return params
    defaults = _sampling()
    explicit = frozenset(f.name for f in dataclasses.fields(SamplingParams)
                         if getattr(cfg.sampling, f.name) != getattr(defaults, f.name))
    kept = sorted(explicit & preset_settings(cfg.preset).keys())
    print(describe_preset(cfg.preset) + (f" (kept yours: {', '.join(kept)})" if kept else ""), file=sys.stderr)
    return apply_preset(params, cfg.preset, explicit)


def strategy(cfg: GenerateConfig, model: nn.Module, params: SamplingParams) -> Strategy:
    """The decoding strategy the flags choose; a draft directory is loaded onto the model's device."""
    draft: nn.Module | Literal["mtp"] = "mtp"
    if cfg.draft and cfg.draft != "mtp":
        draft = load_model(Path(cfg.draft), device=next(model.parameters()).device)
    early = {"true": True, "false": False, "never": "never"}[cfg.early_stopping]
    return Strategy(cfg.kind, params, compile=cfg.compile, num_beams=cfg.num_beams,
                    length_penalty=cfg.length_penalty, early_stopping=early, penalty_alpha=cfg.penalty_alpha,
                    draft=draft, num_draft_tokens=cfg.num_draft_tokens)


def generate_cmd(cfg: GenerateConfig) -> int:
    checkpoint = Path(cfg.checkpoint)
    model = load_model(checkpoint, device=resolve_device(cfg.device))
    if cfg.adapter:
        load_any_adapter(model, cfg.adapter)
    apply_quantize(model, cfg.quantize, adapter=bool(cfg.adapter))
    tokenizer = load_tokenizer(checkpoint)
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise LmforgeError(f"{checkpoint / TOKENIZER_FILE}: tokenizer has {tokenizer.vocab_size} tokens but "
                           f"the model's vocab_size is {model.cfg.vocab_size}")
    ids = prompt_ids(cfg, tokenizer)
    params = sampling_params(cfg, tokenizer)
    if cfg.stop and tokenizer is None:
        raise LmforgeError("--stop needs a tokenizer (tokenizer.json in the checkpoint)")
    stats = RunStats()
    stream = generate_stream(model, ids, strategy(cfg, model, params), stats)
    if cfg.json:
        print(json.dumps(collect_json(stream, tokenizer, cfg.stop, params.max_new_tokens, stats, cfg.kind)))
    else:
        stream_to_terminal(stream, ids, cfg.prompt, tokenizer, cfg.stop)
    if cfg.kind == "speculative":
        spec = stats.speculative
        print(f"speculative decoding: acceptance rate {spec.acceptance_rate:.1%} ({spec.accepted}/{spec.proposed} "
              f"draft tokens), {spec.tokens_per_target_call:.2f} tokens per target call", file=sys.stderr)
    return 0


def collect_json(stream: Iterator[int], tokenizer: Tokenizer | None, stops: Sequence[str], total: int,
                 stats: RunStats, kind: Kind) -> dict[str, Any]:
    """{"ids", "text"} of the whole answer (a progress bar on stderr meanwhile), plus the beam's score or
    the speculative acceptance rate."""
    bar = dict(total=total, desc="generate", unit="tok", disable=None, file=sys.stderr)
    if stops:
        pieces = list(tqdm(stop_at_strings(stream, tokenizer, stops), **bar))
        new_ids, text = [t for t, _ in pieces if t is not None], "".join(p for _, p in pieces)
    else:
        new_ids = list(tqdm(stream, **bar))
        text = tokenizer.decode(new_ids) if tokenizer is not None else None
    extra = {"beam": {"score": stats.score}, "speculative": {"acceptance_rate": stats.speculative.acceptance_rate}}
    reasoning, answer = split_reasoning(text) if text is not None else (None, "")
    thinking = {"reasoning": reasoning, "answer": answer} if reasoning is not None else {}
    return {"ids": new_ids, "text": text, **thinking, **extra.get(kind, {})}


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
        shown = ThinkShown(lambda text: (out.write(text), out.flush()))  # [thinking] ... [answer] ...
        for _, text in stop_at_strings(stream, tokenizer, stops):
            shown.write(text)
        shown.finish()
    out.write("\n")
    out.flush()
