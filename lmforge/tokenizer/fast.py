"""A faster encoder for byte-level BPE tokenizers: the same ids as the HF `tokenizers` model, through tiktoken.

HF `tokenizers` spends most of `lmforge data tokenize`'s time in its BPE encode; tiktoken runs the same algorithm
(regex split, then merge the adjacent pair of lowest rank until none is left) with less overhead per piece. A
`tokenizer.json` maps onto a tiktoken `Encoding` when it has no normalizer; a byte-level BPE model holding all
256 bytes, without dropout, byte fallback or subword affixes; a pre-tokenizer tiktoken reproduces (GPT-2's
byte-level regex, or a Split on one of the known total regexes followed by a byte-level mapping without its own
regex); and added tokens that are all special. Ranks are the merge order (bytes first), and a table maps them back
to the tokenizer's ids.

Every text is read as plain characters: a special token's text becomes ordinary pieces, never its control id
(HF's `encode_special_tokens = True`). `TextEncoder` falls back to HF `tokenizers` with that setting for any
tokenizer tiktoken cannot represent (normalizers, WordPiece, Unigram, other pre-tokenizers), so the ids never
depend on which path ran.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import tiktoken
import tokenizers

from lmforge.tokenizer import GPT4_SPLIT_PATTERN

# GPT-2's pre-tokenizer regex: what `ByteLevel(use_regex=True)` splits with (identical in tiktoken's gpt2)
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3's tokenizer.json spelling of the GPT-4 split (no possessive quantifiers)
LLAMA3_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                        r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Split regexes known to match every character (tiktoken keeps only the matches; HF also keeps the gaps)
TOTAL_PATTERNS = {GPT4_SPLIT_PATTERN, GPT2_SPLIT_PATTERN, LLAMA3_SPLIT_PATTERN}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _split_pattern(pre: dict[str, Any] | None) -> str | None:
    """The regex the pre-tokenizer splits with, if tiktoken reproduces it; else None."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_SPLIT_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) != 2:
        return None
    split, level = steps
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or level.get("type") != "ByteLevel" or level.get("use_regex", True) or level.get("add_prefix_space")):
        return None
    pattern = split.get("pattern", {}).get("Regex")
    return pattern if pattern in TOTAL_PATTERNS else None


def tiktoken_encoding(tokenizer_json: str) -> tuple[tiktoken.Encoding, np.ndarray] | None:
    """(tiktoken Encoding, rank -> token id table) equivalent to this `tokenizer.json`, or None when it cannot be.

    The merge order of the BPE is the rank order (single bytes 0-255, merge i makes rank 256 + i). tiktoken
    encodes a piece that is itself a token as that token at once (HF does so only with `ignore_merges`), so
    without it every merged token must be its own BPE encoding, checked here through the HF model."""
    spec = json.loads(tokenizer_json)
    model = spec.get("model") or {}
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    if (spec.get("normalizer") is not None or pattern is None or model.get("type") != "BPE" or model.get("dropout")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("byte_fallback")
            or any(not t.get("special") for t in spec.get("added_tokens", []))):
        return None
    vocab: dict[str, int] = model["vocab"]
    byte_of = _byte_decoder()
    if any(ch not in vocab for ch in byte_of):  # an input byte without a token: HF would drop it or use unk
        return None
    ranks = {bytes([b]): b for ch, b in byte_of.items()}
    token_ids = [vocab[ch] for ch in sorted(byte_of, key=byte_of.get)]
    merged: list[str] = []
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = left + right
        if token not in vocab or any(ch not in byte_of for ch in token):
            return None
        raw = bytes(byte_of[ch] for ch in token)
        if raw in ranks:  # two merges make the same token: the rank order cannot express both
            return None
        ranks[raw] = len(token_ids)
        token_ids.append(vocab[token])
        merged.append(token)
    if not model.get("ignore_merges") and merged:
        bpe = tokenizers.Tokenizer.from_str(tokenizer_json).model
        if any(len(bpe.tokenize(token)) != 1 for token in merged):
            return None
    encoding = tiktoken.Encoding(name="lmforge-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return encoding, np.asarray(token_ids, dtype=np.int64)


class TextEncoder:
    """Texts -> token ids as plain characters (no special-token parsing, no post-processor): tiktoken where
    `tiktoken_encoding` represents the tokenizer, HF `tokenizers` otherwise; the same ids either way.

    `threads`: how many texts encode at once (1 inside a worker process that already has a core of its own)."""

    def __init__(self, tokenizer_json: str, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 1
        self.hf = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.hf.encode_special_tokens = True
        fast = tiktoken_encoding(tokenizer_json)
        self.tiktoken, self._ids = fast if fast is not None else (None, None)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's token ids (int64 arrays)."""
        if self.tiktoken is None:
            return [np.asarray(e.ids, dtype=np.int64) for e in self.hf.encode_batch_fast(texts,
                                                                                          add_special_tokens=False)]
        ranks = (self.tiktoken.encode_ordinary_batch(texts, num_threads=self.threads) if self.threads > 1
                 else [self.tiktoken.encode_ordinary(text) for text in texts])
        return [self._ids[np.asarray(r, dtype=np.int64)] for r in ranks]
