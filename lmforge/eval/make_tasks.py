"""Ship-with tasks, generated so they need no download: `lmforge eval make-tasks`.

- `synthetic`: held-out prompts of the verifiable synthetic suite (`lmforge.tasks.suite`),
  generative, exact match; chat-formatted, as the post-trained models are asked.
- `cloze`: the last word of held-out prose sentences, multiple choice against distractor words
  drawn from the same text (LAMBADA-style, Paperno et al., 2016, but with choices so a small
  model is scored by log-likelihood rather than by open generation).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.core.config import option
from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_text
from lmforge.data.readers import read_documents
from lmforge.data.shards import INDEX_NAME, ShardSet
from lmforge.tasks.suite import TASK_KINDS, make_examples
from lmforge.tokenizer import Tokenizer

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PROSE_WORD = re.compile(r"^[(\"'`]?[A-Za-z][A-Za-z'-]*[)\"'`]?[,;:]?$")
_LAST_WORD = re.compile(r"^([a-z]{3,})[.!?]$")


def write_task(out_dir: str | Path, spec: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """Write `NAME.yaml` and `NAME.jsonl` into `out_dir`; returns the YAML path."""
    import yaml

    out_dir = Path(out_dir)
    name = spec["name"]
    atomic_write_text(out_dir / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    path = out_dir / f"{name}.yaml"
    atomic_write_text(path, yaml.safe_dump({**spec, "data": f"{name}.jsonl"}, sort_keys=False))
    return path


def make_synthetic_task(out_dir: str | Path, n: int = 120, seed: int = 1, name: str = "synthetic",
                        chat: bool = True, kinds: Sequence[str] | None = None) -> Path:
    """Held-out synthetic examples (an odd seed draws from the half of the prompt space SFT never sees)."""

    if seed % 2 == 0:
        raise LmforgeError(f"synthetic task seed must be odd (the held-out half), got {seed}")
    examples = make_examples(n, seed, kinds or TASK_KINDS)
    rows = [{"kind": e.kind, "prompt": e.prompt, "answer": e.answer} for e in examples]
    spec = {"name": name, "type": "generate", "prompt": "{prompt}", "answer": "answer", "chat": chat,
            "stop": ["\n"], "max_new_tokens": 16}
    return write_task(out_dir, spec, rows)


def prose_sentences(text: str, min_words: int = 5, max_words: int = 40) -> Iterator[tuple[str, str]]:
    """(context, last word) of each prose-looking sentence: plain words (maybe quoted or in brackets),
    ending in a lower-case word of 3+ letters and a full stop. Code and tables fail the word test."""
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        words = sentence.split()
        if not min_words <= len(words) <= max_words:
            continue
        last = _LAST_WORD.match(words[-1])
        if last is None or not all(_PROSE_WORD.match(w) for w in words[:-1]):
            continue
        yield " ".join(words[:-1]), last.group(1)


def make_cloze_rows(texts: Iterable[str], n: int = 200, n_choices: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """Up to `n` cloze examples; distractors are other sentence-final words of the same texts."""
    if n_choices < 2:
        raise LmforgeError(f"n_choices must be >= 2, got {n_choices}")
    pairs = [p for text in texts for p in prose_sentences(text)]
    vocab = sorted({w for _, w in pairs})
    if len(vocab) < n_choices:
        raise LmforgeError(f"cloze: found {len(pairs)} prose sentences with {len(vocab)} distinct final words; "
                           f"need at least {n_choices} (give more prose text)")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    rows = []
    seen = set()
    for context, word in pairs:
        if context in seen:
            continue
        seen.add(context)
        distractors = rng.sample([w for w in vocab if w != word], n_choices - 1)
        choices = [word, *distractors]
        rng.shuffle(choices)
        rows.append({"context": context, "choices": choices, "answer": choices.index(word)})
        if len(rows) == n:
            break
    return rows


def texts_from_source(source: str | Path, tokenizer_dir: str | Path | None = None) -> Iterator[str]:
    """Documents of text/JSONL files, or of a token shard directory decoded with its tokenizer."""

    source = Path(source)
    if (source / INDEX_NAME).is_file():
        if tokenizer_dir is None:
            raise LmforgeError(f"{source} holds token shards: pass --tokenizer to decode them")
        tokenizer, shards = Tokenizer.load(tokenizer_dir), ShardSet(source)
        start = 0
        for end in shards.doc_ends().tolist():
            yield tokenizer.decode(shards.read(start, int(end) - start).tolist())
            start = int(end)
    else:
        for doc in read_documents([source]):
            yield doc.text


def make_cloze_task(out_dir: str | Path, source: str | Path, tokenizer_dir: str | Path | None = None,
                    n: int = 200, n_choices: int = 4, seed: int = 0, name: str = "cloze") -> Path:
    rows = make_cloze_rows(texts_from_source(source, tokenizer_dir), n, n_choices, seed)
    spec = {"name": name, "type": "multiple_choice", "prompt": "{context}", "choices": "choices",
            "answer": "answer"}
    return write_task(out_dir, spec, rows)


@dataclass
class MakeTasksConfig:
    output: str = option("tasks", "directory to write the task YAML + JSONL files to")
    source: str = option("", "held-out text for the cloze task: text/JSONL files or a directory, or a token "
                             "shard directory (with --tokenizer), e.g. RUN/shards/val; empty skips cloze")
    tokenizer: str = option("", "tokenizer directory, to decode a shard source")
    cloze_n: int = option(200, "cloze examples")
    cloze_choices: int = option(4, "choices per cloze example")
    synthetic_n: int = option(120, "synthetic-suite examples; 0 skips the task")
    synthetic_chat: bool = option(True, "ask the synthetic task through the chat template")
    seed: int = option(0, "seed of the cloze draw")


def make_tasks(cfg: MakeTasksConfig) -> list[Path]:
    """Write the shipped tasks; returns their YAML paths."""
    paths = []
    if cfg.synthetic_n > 0:
        paths.append(make_synthetic_task(cfg.output, cfg.synthetic_n, chat=cfg.synthetic_chat))
    if cfg.source:
        paths.append(make_cloze_task(cfg.output, cfg.source, cfg.tokenizer or None, cfg.cloze_n,
                                     cfg.cloze_choices, cfg.seed))
    if not paths:
        raise LmforgeError("make-tasks: nothing to write (synthetic_n is 0 and no --source for cloze)")
    return paths


def make_tasks_cmd(cfg: MakeTasksConfig) -> int:
    for path in make_tasks(cfg):
        n = sum(1 for _ in open(path.with_suffix(".jsonl"), encoding="utf-8"))
        print(f"wrote {path} ({n} examples)")
    return 0
