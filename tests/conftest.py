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
