"""A tiny random model behind `lmforge serve`'s app, in-process, and the engine reference its replies must equal
(the API tests and the browser test share them). Import after `pytest.importorskip("fastapi")`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tinymodels import mha_model, save_checkpoint, text_tokenizer

from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import load_model
from lmforge.serve.app import BackgroundServer, create_app
from lmforge.tokenizer import Tokenizer

NAME = "tiny"  # the served model's id
CONTEXT = 128


@contextmanager
def serving(directory: Path, context: int = CONTEXT, **app_kwargs: Any) -> Iterator[tuple[Any, Any, Tokenizer]]:
    """Save a tiny random model + tokenizer to `directory`, load it back, serve it; yields (server, model, tok)."""
    tok = text_tokenizer()
    save_checkpoint(mha_model(tok.vocab_size, seed=3, init_std=0.2, max_seq_len=context), tok, directory)
    model, tok = load_model(directory), Tokenizer.load(directory)
    with BackgroundServer(create_app(model, tok, NAME, **app_kwargs)) as server:
        yield server, model, tok


def greedy_reference(model: Any, tok: Tokenizer, ids: list[int], n: int, stops: list[int]) -> str:
    """What the engine alone writes greedily: the text every greedy server reply must equal."""
    return tok.decode(generate(model, ids, SamplingParams(greedy=True, max_new_tokens=n, stop_token_ids=stops)))


@contextmanager
def slow_steps(scheduler: Any, seconds: float = 0.01) -> Iterator[None]:
    """Make every scheduler step take a while, so a test can act while requests are running."""
    step = scheduler.step

    def slow():
        time.sleep(seconds)
        step()

    scheduler.step = slow
    try:
        yield
    finally:
        del scheduler.step
