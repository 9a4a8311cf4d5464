"""Encoder-decoder: bidirectional encoder, causal decoder, cross-attention over padded sources, cached greedy
decoding equal to recomputing, save/load."""

from __future__ import annotations

import torch

from lmforge.core.config import from_dict
from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams
from lmforge.model import ModelConfig, save_model
from lmforge.model.encdec import EncoderDecoder, build_model, shift_right
from lmforge.model.io import load_model

VOCAB = 64


def model(**overrides) -> EncoderDecoder:
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"preset": "t5-tiny", "vocab_size": VOCAB, "d_model": 32, "n_heads": 4,
                                  "n_layers": 2, "n_encoder_layers": 3, "d_ff": 48, "max_seq_len": 40, **overrides})
    m = EncoderDecoder(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so that every path visibly moves the output
        for p in m.parameters():
            p.mul_(3.0)
    return m


def ids(T: int, seed: int, B: int = 2) -> torch.Tensor:
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_structure_and_shapes():
    m = model()
    assert len(m.encoder) == 3 and len(m.blocks) == 2
    assert all(b.cross_attn is not None for b in m.blocks) and all(b.cross_attn is None for b in m.encoder)
    assert isinstance(build_model(m.cfg), EncoderDecoder)
    assert m(ids(9, 1), ids(5, 2)).shape == (2, 5, VOCAB)


def test_encoder_is_bidirectional_and_decoder_causal():
    m, src, tgt = model(), ids(9, 1), ids(6, 2)
    with torch.no_grad():
        enc = m.encode(src)
        later_src = src.clone()
        later_src[:, -1] = (later_src[:, -1] + 1) % VOCAB
        assert not torch.allclose(m.encode(later_src)[:, 0], enc[:, 0], atol=1e-4)
        base = m(src, tgt)
        later_tgt = tgt.clone()
        later_tgt[:, 4] = (later_tgt[:, 4] + 1) % VOCAB
        out = m(src, later_tgt)
        assert torch.allclose(out[:, :4], base[:, :4], atol=1e-6)
        assert not torch.allclose(out[:, 4:], base[:, 4:], atol=1e-4)
        assert not torch.allclose(m(later_src, tgt), base, atol=1e-4)  # every target row reads the source


def test_source_padding_is_invisible():
    m, src, tgt = model(), ids(9, 1), ids(6, 2)
    padded = torch.cat([src, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 9), torch.zeros(2, 4)], dim=1).long()
    with torch.no_grad():
        assert torch.allclose(m(padded, tgt, mask), m(src, tgt), atol=1e-5)


def test_cached_greedy_equals_recomputing():
    greedy = SamplingParams(greedy=True, max_new_tokens=10)
    for overrides in ({}, dict(position="alibi"), dict(position="rope"), dict(norm_placement="deepnorm")):
        m, src, n = model(**overrides), ids(9, 1), 10
        out = generate(m, src.tolist(), greedy)  # both sources decoded as one batch
        tgt = torch.full((2, 1), m.cfg.decoder_start_id)
        with torch.no_grad():
            for _ in range(n):
                tgt = torch.cat([tgt, m(src, tgt)[:, -1:].argmax(-1)], dim=1)
        assert out == tgt[:, 1:].tolist(), overrides


def test_greedy_stops_at_eos():
    m, src = model(), ids(9, 1, B=1)[0].tolist()
    first = generate(m, src, SamplingParams(greedy=True, max_new_tokens=4))
    assert generate(m, src, SamplingParams(greedy=True, max_new_tokens=10, stop_token_ids=[first[1]])) == first[:1]


def test_shift_right():
    targets = torch.tensor([[5, 6, 7, -100]])
    assert shift_right(targets, 0).tolist() == [[0, 5, 6, 7]]


def test_save_and_load(tmp_path):
    m = model()
    save_model(m, tmp_path / "m")
    back = load_model(tmp_path / "m")
    src, tgt = ids(7, 3), ids(4, 4)
    with torch.no_grad():
        assert torch.equal(back(src, tgt), m(src, tgt))
