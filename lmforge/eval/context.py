"""`lmforge eval context`: perplexity at 1x, 2x, 4x ... a model's original context length.

This is the measurement of a context-window extension (recipes/extend-context.toml): a model trained
at length N is scored on windows of N, 2N, 4N tokens, before (it must extrapolate past N: RoPE
angles it never saw) and after fine-tuning on longer sequences with RoPE scaling (position
interpolation, NTK/YaRN, LLaMA-3.1: `model.rope_scaling`). A model whose max_seq_len is below a
window is rebuilt with a larger max_seq_len (same weights, same RoPE settings) so it can be scored
there; learned absolute positions cannot extrapolate and are refused.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json
from lmforge.core.runtime import resolve_device
from lmforge.data.shards import ShardSet
from lmforge.eval.perplexity import resolve_shard_dir
from lmforge.model.config import ModelConfig
from lmforge.model.io import WEIGHTS_NAME, load_into, load_weights, read_model_config
from lmforge.model.transformer import Transformer
from lmforge.train.evaluate import evaluate_perplexity


@dataclass
class ContextEvalConfig:
    checkpoint: str = option(help="model directory to score (e.g. the context-extended model)")
    data: str = option(help="token shards: a directory with index.json, or one holding val/ (or train/)")
    baseline: str = option("", "a second model to score on the same windows (e.g. the model before extension)")
    lengths: str = option("1,2,4", "window lengths as comma-separated multiples of the original context")
    original_length: int = option(0, "the original context N; 0 reads it from the checkpoint "
                                     "(model.rope_original_max_seq_len, else max_seq_len)")
    batch_size: int = option(4, "windows per forward pass")
    max_batches: int = option(8, "batches scored per length; 0 scores every window once")
    output: str = option("", "also write the results to this JSON file")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto")


def original_length(cfg: ModelConfig) -> int:
    """The context the model was (pre)trained with: RoPE scaling records it, else it is max_seq_len."""
    if cfg.rope_scaling != "none" and cfg.rope_original_max_seq_len:
        return cfg.rope_original_max_seq_len
    return cfg.max_seq_len


def load_for_length(directory: str | Path, length: int, device: torch.device | str = "cpu") -> Transformer:
    """The model at `directory` with room for `length` tokens: max_seq_len raised if needed, nothing else
    changed (an unscaled RoPE model then extrapolates, which is what 'before extension' measures)."""
    cfg = read_model_config(directory)
    if length > cfg.max_seq_len:
        if cfg.position == "learned":
            raise LmforgeError(f"{directory}: learned absolute positions stop at max_seq_len={cfg.max_seq_len}; "
                               f"cannot score {length}-token windows")
        keep_original = {"rope_original_max_seq_len": original_length(cfg)} if cfg.rope_scaling != "none" else {}
        cfg = dataclasses.replace(cfg, max_seq_len=length, **keep_original)
    model = Transformer(cfg)
    load_into(model, load_weights(Path(directory) / WEIGHTS_NAME), str(Path(directory) / WEIGHTS_NAME))
    return model.to(device).eval()


def context_perplexities(directory: str | Path, shards: ShardSet, lengths: list[int], batch_size: int = 4,
                         max_batches: int = 8, device: torch.device | str = "cpu") -> dict[int, float]:
    """Perplexity of the model at `directory` on windows of each length (same text for every model)."""
    out = {}
    for n in lengths:
        if shards.n_tokens <= n:
            raise LmforgeError(f"data: {shards.n_tokens} tokens are too few for a {n}-token window")
        model = load_for_length(directory, n, device)
        out[n] = evaluate_perplexity(model, shards, n, batch_size, max_batches, device=device)["perplexity"]
    return out


def parse_multiples(text: str) -> list[float]:
    """'1,2,4' -> [1.0, 2.0, 4.0]; anything else is a one-line user error."""
    try:
        multiples = [float(part) for part in text.replace(" ", ",").split(",") if part]
    except ValueError:
        raise LmforgeError(f"--lengths: expected comma-separated numbers such as 1,2,4, got '{text}'") from None
    if not multiples or any(m <= 0 for m in multiples):
        raise LmforgeError(f"--lengths: give positive multiples of the original context, got '{text}'")
    return multiples


def parse_lengths(multiples: list[float], base: int) -> list[int]:
    return [max(2, round(m * base)) for m in multiples]


def table(multiples: list[float], lengths: list[int], results: dict[str, dict[int, float]]) -> str:
    names = list(results)
    lines = ["| length | tokens | " + " | ".join(f"ppl {n}" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for m, n in zip(multiples, lengths, strict=True):
        lines.append(f"| {m:g}x | {n} | " + " | ".join(f"{results[k][n]:.3f}" for k in names) + " |")
    return "\n".join(lines)


def context_eval_cmd(cfg: ContextEvalConfig) -> int:

    if cfg.batch_size < 1 or cfg.max_batches < 0:
        raise LmforgeError("batch_size must be >= 1 and max_batches >= 0")
    device = resolve_device(cfg.device)
    base = cfg.original_length or original_length(read_model_config(cfg.baseline or cfg.checkpoint))
    multiples = parse_multiples(cfg.lengths)
    lengths = parse_lengths(multiples, base)
    shards = ShardSet(resolve_shard_dir(cfg.data))
    models = {"checkpoint": cfg.checkpoint, **({"baseline": cfg.baseline} if cfg.baseline else {})}
    results = {}
    for name, directory in models.items():
        print(f"eval context: {name} {directory} at {', '.join(map(str, lengths))} tokens", file=sys.stderr)
        results[name] = context_perplexities(directory, shards, lengths, cfg.batch_size, cfg.max_batches, device)
    print(f"original context: {base} tokens")
    print(table(multiples, lengths, results))
    if cfg.output:
        ppl = {name: {str(n): v for n, v in r.items()} for name, r in results.items()}
        atomic_write_json(cfg.output, {"original_length": base, "lengths": lengths, "multiples": multiples,
                                       "models": models, "perplexity": ppl})
    return 0
