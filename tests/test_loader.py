import json

import numpy as np
import pytest
import torch

from lmforge.core.errors import LmforgeError
from lmforge.data.loader import SequenceLoader
from lmforge.data.shards import ShardSet, ShardWriter

SEQ = 8


def position_shards(tmp_path, n_tokens: int, max_shard_tokens: int = 50) -> ShardSet:
    """Token value == its position in the stream, so a window's start reveals its index."""
    with ShardWriter(tmp_path, 1 << 16, max_shard_tokens=max_shard_tokens) as w:
        for start in range(0, n_tokens, 13):  # documents of 13 tokens
            w.add(np.arange(start, min(start + 13, n_tokens)))
    return ShardSet(tmp_path)


def windows_of(inputs: torch.Tensor) -> list[int]:
    return (inputs[:, 0] // SEQ).tolist()


def test_windows_and_shifted_targets(tmp_path):
    ss = position_shards(tmp_path, 10 * SEQ + 1)
    loader = SequenceLoader(ss, batch_size=4, seq_len=SEQ, seed=1)
    assert loader.n_windows == 10
    inputs, targets = loader.next_batch()
    assert inputs.shape == targets.shape == (4, SEQ)
    assert inputs.dtype == targets.dtype == torch.long
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    for row_in, row_tg, w in zip(inputs, targets, windows_of(inputs)):
        full = torch.from_numpy(ss.read(w * SEQ, SEQ + 1))
        assert torch.equal(row_in, full[:-1]) and torch.equal(row_tg, full[1:])


def test_sequential_order(tmp_path):
    loader = SequenceLoader(position_shards(tmp_path, 10 * SEQ + 1), 4, SEQ, shuffle=False)
    seen = [windows_of(loader.next_batch()[0]) for _ in range(3)]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert loader.state_dict() == {"epoch": 1, "cursor": 2}


def test_deterministic_per_seed_and_covers_every_window(tmp_path):
    ss = position_shards(tmp_path, 40 * SEQ + 5)
    a, b, c = (SequenceLoader(ss, 5, SEQ, seed=s) for s in (7, 7, 8))
    seen_a = [w for _ in range(8) for w in windows_of(a.next_batch()[0])]
    seen_b = [w for _ in range(8) for w in windows_of(b.next_batch()[0])]
    seen_c = [w for _ in range(8) for w in windows_of(c.next_batch()[0])]
    assert seen_a == seen_b != seen_c
    assert sorted(seen_a) == sorted(seen_c) == list(range(40))  # one epoch = each window once
    assert seen_a == np.random.default_rng(7).permutation(40).tolist()


def test_epoch_rollover(tmp_path):
    loader = SequenceLoader(position_shards(tmp_path, 10 * SEQ + 3), 4, SEQ, seed=3)
    seen = [w for _ in range(5) for w in windows_of(loader.next_batch()[0])]  # 20 windows = 2 epochs
    assert seen[:10] == np.random.default_rng(3).permutation(10).tolist()
    assert seen[10:] == np.random.default_rng(4).permutation(10).tolist()
    assert loader.state_dict() == {"epoch": 2, "cursor": 0}


@pytest.mark.parametrize("consumed", [0, 1, 2, 3, 7])
def test_exact_resume(tmp_path, consumed):
    ss = position_shards(tmp_path, 10 * SEQ + 1)
    reference = SequenceLoader(ss, 3, SEQ, seed=11)
    expected = [reference.next_batch() for _ in range(consumed + 6)][consumed:]

    first = SequenceLoader(ss, 3, SEQ, seed=11)
    for _ in range(consumed):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = SequenceLoader(ss, 3, SEQ, seed=11)
    resumed.load_state_dict(state)
    for (x_exp, y_exp), (x, y) in zip(expected, (resumed.next_batch() for _ in range(6))):
        assert torch.equal(x, x_exp) and torch.equal(y, y_exp)


def test_iter_yields_batches(tmp_path):
    loader = SequenceLoader(position_shards(tmp_path, 3 * SEQ + 1), 2, SEQ, shuffle=False)
    batches = [b for _, b in zip(range(4), loader)]
    assert [windows_of(x) for x, _ in batches] == [[0, 1], [2, 0], [1, 2], [0, 1]]


def test_too_few_tokens(tmp_path):
    ss = position_shards(tmp_path, SEQ)
    with pytest.raises(LmforgeError) as e:
        SequenceLoader(ss, 2, SEQ)
    assert str(tmp_path) in str(e.value) and f"{SEQ} tokens" in str(e.value) and "\n" not in str(e.value)
    SequenceLoader(position_shards(tmp_path / "ok", SEQ + 1), 4, SEQ)  # one window serves any batch size


@pytest.mark.parametrize("state", [{"epoch": 0}, {"epoch": -1, "cursor": 0}, {"epoch": 0, "cursor": 10},
                                   {"epoch": "0", "cursor": 0}])
def test_bad_state(tmp_path, state):
    loader = SequenceLoader(position_shards(tmp_path, 10 * SEQ + 1), 2, SEQ)
    with pytest.raises(LmforgeError, match="loader state"):
        loader.load_state_dict(state)


def test_ranks_split_one_global_batch(tmp_path):
    ss = position_shards(tmp_path, 20 * SEQ + 1)
    single = SequenceLoader(ss, 6, SEQ, seed=5)
    ranks = [SequenceLoader(ss, 2, SEQ, seed=5, rank=r, world_size=3) for r in range(3)]
    for _ in range(5):  # crosses an epoch boundary (20 windows, 6 per step)
        expected = windows_of(single.next_batch()[0])
        assert [w for loader in ranks for w in windows_of(loader.next_batch()[0])] == expected
    assert all(loader.state_dict() == single.state_dict() for loader in ranks)
    with pytest.raises(LmforgeError, match="rank"):
        SequenceLoader(ss, 2, SEQ, rank=3, world_size=3)
