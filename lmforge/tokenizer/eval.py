"""`lmforge tokenizer eval`: compression of several tokenizers on the same held-out text, side by side.

Compression is what a tokenizer buys a model: fewer tokens per byte means more text per context
window and per FLOP. Bytes/token (UTF-8 bytes of the text over its token count) is comparable
across tokenizers and languages; tokens/word ("fertility", Rust et al. 2021) shows how often words
are split; chars/token is the figure tokenizer papers often quote.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError, os_errors
from lmforge.core.files import atomic_write_json
from lmforge.data.readers import read_documents
from lmforge.tokenizer import Tokenizer

METRICS = ("bytes_per_token", "tokens_per_word", "chars_per_token")
_BATCH = 256


@dataclass
class TokenizerEvalConfig:
    tokenizers: list[str] = option(default_factory=list, help="tokenizer directories (or tokenizer.json files)")
    input: list[str] = option(default_factory=list, help="held-out text/JSONL files or directories")
    output: str = option("", help="also write the results as JSON to this file")
    text_field: str = option("text", help="JSONL field holding the text")
    max_docs: int = option(0, help="evaluate on at most this many documents (0 = all)")


def compression(tokenizer: Tokenizer, texts: Iterable[str]) -> dict[str, Any]:
    """Token, byte, character and whitespace-word counts of `texts`, and the three ratios."""
    counts = {"n_docs": 0, "n_tokens": 0, "n_bytes": 0, "n_chars": 0, "n_words": 0}
    it = iter(texts)
    while batch := list(itertools.islice(it, _BATCH)):
        counts["n_docs"] += len(batch)
        counts["n_tokens"] += sum(len(ids) for ids in tokenizer.encode_batch(batch))
        counts["n_bytes"] += sum(len(t.encode("utf-8")) for t in batch)
        counts["n_chars"] += sum(len(t) for t in batch)
        counts["n_words"] += sum(len(t.split()) for t in batch)
    n_tokens = max(counts["n_tokens"], 1)
    return {"vocab_size": tokenizer.vocab_size, **counts,
            "bytes_per_token": counts["n_bytes"] / n_tokens,
            "tokens_per_word": counts["n_tokens"] / max(counts["n_words"], 1),
            "chars_per_token": counts["n_chars"] / n_tokens}


def compare_tokenizers(tokenizers: dict[str, Tokenizer], texts: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`compression` for each named tokenizer on the same texts."""
    if not texts:
        raise LmforgeError("tokenizer eval: no non-empty text to evaluate on")
    return {name: compression(tok, texts) for name, tok in tokenizers.items()}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per figure, one column per tokenizer."""
    names = list(results)
    rows = [["figure", *names], ["---"] * (len(names) + 1)]
    rows.append(["vocab size", *(f"{results[n]['vocab_size']:,}" for n in names)])
    rows.append(["tokens", *(f"{results[n]['n_tokens']:,}" for n in names)])
    rows += [[metric.replace("_", " ").replace(" per ", "/"), *(f"{results[n][metric]:.3f}" for n in names)]
             for metric in METRICS]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _names(paths: Sequence[str]) -> list[str]:
    """Column names: each tokenizer's directory name, made unique by its position when names repeat."""
    names = [Path(p).name if Path(p).is_dir() else Path(p).parent.name or Path(p).name for p in paths]
    return [f"{n} ({i})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def tokenizer_eval_cmd(cfg: TokenizerEvalConfig) -> int:

    if not cfg.tokenizers:
        raise LmforgeError("tokenizer eval: no tokenizers; pass --tokenizers DIR [DIR ...]")
    if not cfg.input:
        raise LmforgeError("tokenizer eval: no input; pass --input FILE_OR_DIR [...]")
    if cfg.max_docs < 0:
        raise LmforgeError(f"max_docs must be >= 0, got {cfg.max_docs}")
    tokenizers = dict(zip(_names(cfg.tokenizers), (Tokenizer.load(p) for p in cfg.tokenizers)))
    docs = (d.text for d in read_documents(cfg.input, text_field=cfg.text_field) if d.text)
    with os_errors():
        texts = list(itertools.islice(docs, cfg.max_docs) if cfg.max_docs else docs)
    if not texts:
        raise LmforgeError(f"tokenizer eval: no text found in {', '.join(cfg.input)}")
    results = compare_tokenizers(tokenizers, texts)
    n_bytes = next(iter(results.values()))["n_bytes"]
    print(f"compression on {len(texts)} documents ({n_bytes / 1e6:.2f} MB)\n")
    print(format_table(results))
    if cfg.output:
        atomic_write_json(Path(cfg.output), {"input": list(cfg.input), "tokenizers": dict(
            zip(results, cfg.tokenizers)), "results": results})
        print(f"\nwrote {cfg.output}")
    return 0
