"""Prefix decoder (bidirectional over the prefix, causal after it): the mask by hand, what each position can
see, the prefix-LM loss layout, and cached generation equal to recomputing the whole sequence."""

from __future__ import annotations

import numpy as np
import torch
from tinymodels import debug_model

from lmforge.core.tensors import IGNORE_INDEX
from lmforge.model import Transformer
from lmforge.model.attention import attention_mask
from lmforge.model.encdec import prefix_lm_greedy
from lmforge.train.denoise import collate, denoise_loss
from lmforge.train.objectives import causal_lm_loss

VOCAB = 64


def model(**overrides) -> Transformer:
    return debug_model(VOCAB, 0, max_seq_len=48, **overrides)


def ids(T: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def test_mask_by_hand():
    mask = attention_mask(5, 5, 0, torch.device("cpu"), prefix_len=torch.tensor([2, 0]))
    assert mask.shape == (2, 1, 5, 5)
    assert mask[0, 0].int().tolist() == [[1, 1, 0, 0, 0],
                                         [1, 1, 0, 0, 0],
                                         [1, 1, 1, 0, 0],
                                         [1, 1, 1, 1, 0],
                                         [1, 1, 1, 1, 1]]
    assert mask[1, 0].int().tolist() == torch.tril(torch.ones(5, 5)).int().tolist()  # no prefix: causal


def test_what_each_position_sees():
    m, x, P = model(), ids(), 4
    prefix = torch.full((2,), P)
    with torch.no_grad():
        base = m(x, prefix_len=prefix)
        later = x.clone()
        later[:, 7] = (later[:, 7] + 1) % VOCAB  # a token after the prefix
        out = m(later, prefix_len=prefix)
        assert torch.allclose(out[:, :7], base[:, :7], atol=1e-6)  # nothing before it moves (prefix included)
        assert not torch.allclose(out[:, 7:], base[:, 7:], atol=1e-4)
        inside = x.clone()
        inside[:, 3] = (inside[:, 3] + 1) % VOCAB  # the last prefix token
        out = m(inside, prefix_len=prefix)
        assert not torch.allclose(out[:, 0], base[:, 0], atol=1e-4)  # prefix position 0 sees it (bidirectional)
        assert torch.allclose(m(inside)[:, :3], m(x)[:, :3], atol=1e-6)  # a causal LM's position 0-2 do not


def test_prefix_lm_loss_is_on_the_part_after_the_prefix():
    src, tgt = np.array([5, 6, 7]), np.array([8, 9])
    batch = collate([(src, tgt), (np.array([1]), np.array([2, 3, 4]))], encdec=False, start_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [1, 2, 3, 0]]
    assert batch["targets"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 8, 9], [2, 3, 4, IGNORE_INDEX]]
    assert batch["prefix_len"].tolist() == [3, 1]
    m = model()
    with torch.no_grad():
        loss, _ = denoise_loss(m, batch)
        logits = m(batch["input_ids"], prefix_len=batch["prefix_len"])
        assert torch.allclose(loss, causal_lm_loss(logits, batch["targets"]), atol=1e-5)


def test_cached_generation_equals_recomputing_with_the_prefix():
    m, prompt, n = model(), ids(6), 8
    out = prefix_lm_greedy(m, prompt, n)
    seq = prompt
    with torch.no_grad():
        for _ in range(n):  # no cache: the whole sequence each step, the prompt as the prefix
            nxt = m(seq, prefix_len=torch.full((2,), prompt.shape[1]))[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq[:, prompt.shape[1]:])


def test_prefix_with_alibi_and_t5_bias():
    for overrides in (dict(position="alibi"), dict(position="t5", rel_buckets=8, rel_max_distance=16)):
        m, x = model(**overrides), ids()
        later = x.clone()
        later[:, 8] = (later[:, 8] + 1) % VOCAB
        prefix = torch.full((2,), 5)
        with torch.no_grad():
            assert torch.allclose(m(x, prefix_len=prefix)[:, :8], m(later, prefix_len=prefix)[:, :8], atol=1e-6)
