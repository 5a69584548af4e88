"""ShardedSampler in one process: per-epoch coverage, seeding, mid-epoch start."""
import pytest
import torch

from data.sampler import ShardedSampler


def _epoch(n, world, seed, epoch, shuffle=True):
    out = []
    for r in range(world):
        s = ShardedSampler(n, r, world, seed=seed, shuffle=shuffle)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (11, 2), (103, 4), (3, 4)])
def test_each_sample_at_most_once_and_tail_smaller_than_world(n, world):
    shards = _epoch(n, world, seed=3, epoch=0)
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(n))
    assert n - len(flat) < world  # only the ragged tail is dropped
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps


def test_without_shuffle_is_strided_order():
    assert _epoch(7, 2, 0, 0, shuffle=False) == [[0, 2, 4], [1, 3, 5]]


def test_seed_and_epoch_change_the_order_deterministically():
    a = _epoch(100, 2, seed=1, epoch=0)
    assert a == _epoch(100, 2, seed=1, epoch=0)
    assert a != _epoch(100, 2, seed=1, epoch=1)
    assert a != _epoch(100, 2, seed=2, epoch=0)
    # Every epoch covers everything when the data divides evenly.
    for e in range(3):
        assert sorted(i for s in _epoch(100, 2, 1, e) for i in s) == list(range(100))
    # The permutation is torch's randperm seeded with seed + epoch (the documented rule).
    g = torch.Generator().manual_seed(1 + 1)
    perm = torch.randperm(100, generator=g).tolist()
    assert _epoch(100, 2, 1, 1) == [perm[0::2], perm[1::2]]


def test_start_mid_epoch_gives_the_remaining_order():
    s = ShardedSampler(50, 1, 2, seed=7)
    s.set_epoch(4)
    full = list(s)
    assert len(s) == s.samples_per_rank == 25
    for start in (0, 1, 13, 25):
        s.set_epoch(4, start=start)
        assert list(s) == full[start:] and len(s) == 25 - start
    with pytest.raises(ValueError):
        s.set_epoch(4, start=26)
    with pytest.raises(ValueError):
        ShardedSampler(10, 2, 2)
