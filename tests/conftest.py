"""Shared fixtures. Helpers the fixtures build on are plain modules beside this file (see tests/README.md):
`tinymodels` (models, tokenizers, checkpoint dirs), `fakes` (batch sources, shard sets), `textdata` (text),
`recipes` (pretraining configs, torchrun), `tinyserver` (an in-process server). No test module imports
another test module (tests/test_architecture.py checks it).

Fast loop: `pytest -m "not slow"` skips the end-to-end tests marked `@pytest.mark.slow`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import learnable_shards
from tinymodels import task_tokenizer

from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def learnable_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DATA/ with a train/ split of 6000 learnable tokens (vocab 64): what `recipes.parallel_recipe` reads.
    Shared by the session; tests only read it."""
    data = tmp_path_factory.mktemp("learnable")
    learnable_shards(data / "train", n_tokens=6000, n_docs=20, bytes_per_token=2)
    return data


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """`tinymodels.task_tokenizer()`: 512-token BPE with the chat template, trained once per session."""
    return task_tokenizer()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(server, model, tokenizer): a tiny model behind an in-process `lmforge serve` (the serving extra)."""
    pytest.importorskip("fastapi")
    from tinyserver import serving  # imports lmforge.serve, which needs the serving extra

    with serving(tmp_path_factory.mktemp("ckpt"), max_batch=8, max_concurrent=16) as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    """The official `openai` client pointed at `served`."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=30)
