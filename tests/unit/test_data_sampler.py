"""The sampler in one process: the bijection, per-epoch coverage over 1-3 ranks, seeding, mid-epoch
start, the j*W + r layout, laziness at huge N, and the shard-local mode."""
import numpy as np
import pytest

from data.sampler import Bijection, ShardedSampler, shard_runs

PRIMES = [2, 3, 5, 7, 11, 13, 97, 101, 1009, 7919, 65521]
POWERS = [1 << k for k in range(17)]
NEAR_POWERS = [(1 << k) + d for k in range(1, 17) for d in (-1, 1)]


@pytest.mark.parametrize("n", sorted(set(range(0, 40)) | set(PRIMES) | set(POWERS) | set(NEAR_POWERS)))
def test_bijection_is_a_permutation(n):
    values = Bijection(n, 7, 3)(np.arange(n))
    assert values.dtype == np.int64
    assert np.array_equal(np.sort(values), np.arange(n))


def test_bijection_is_pointwise_and_keyed():
    n = 10_007
    b = Bijection(n, 1, 2)
    full = b(np.arange(n))
    some = np.array([5, 9_999, 0, 5])
    assert np.array_equal(b(some), full[some])  # any position on its own, in any order
    assert np.array_equal(full, Bijection(n, 1, 2)(np.arange(n)))  # deterministic
    for other in ((1, 3), (2, 2), (1, 2, 0)):
        assert (Bijection(n, *other)(np.arange(n)) != full).mean() > 0.9
    assert (full != np.arange(n)).mean() > 0.9  # not near the identity
    with pytest.raises(IndexError):
        b(np.array([n]))


def _epoch(n, world, seed, epoch, shuffle=True, shard_sizes=None):
    out = []
    for r in range(world):
        s = ShardedSampler(n, r, world, seed=seed, shuffle=shuffle, shard_sizes=shard_sizes)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (11, 2), (103, 3), (103, 4), (3, 4), (1000, 3),
                                     (70_001, 3)])
def test_each_sample_once_and_tail_smaller_than_world(n, world):
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
    for e in range(3):  # every epoch covers everything when the data divides evenly
        assert sorted(i for s in _epoch(100, 2, 1, e) for i in s) == list(range(100))


def test_rank_r_takes_position_j_times_w_plus_r_whatever_w():
    """After every rank consumed J samples, the consumed set is the first J*W positions of one
    epoch order that does not depend on the world size."""
    n, seed, epoch = 1_000, 4, 2
    order = _epoch(n, 1, seed, epoch)[0]  # one rank reads the epoch order itself
    assert len(order) == n
    for world in (2, 3, 4):
        shards = _epoch(n, world, seed, epoch)
        for r in range(world):
            assert shards[r] == order[r::world][: n // world]
        for consumed in (0, 1, 60, n // world):
            assert set(i for s in shards for i in s[:consumed]) == set(order[: consumed * world])


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


def test_an_iterator_keeps_the_epoch_it_was_made_in():
    s = ShardedSampler(1_000, 0, 2, seed=1)
    s.set_epoch(3, start=10)
    expected = s.epoch_indices()[10:].tolist()
    it = iter(s)
    s.set_epoch(4)  # the trainer moves on only after an epoch's iterator is done; still, be safe
    assert list(it) == expected


def test_first_samples_of_a_huge_epoch_come_without_building_it():
    """10^12 samples over 64 ranks: nothing of size N is built (it would need 8 TB)."""
    n, world = 10**12, 64
    s = ShardedSampler(n, 5, world, seed=0)
    s.set_epoch(1, start=s.samples_per_rank - 3)
    tail = list(s)
    assert len(tail) == 3 and len(set(tail)) == 3 and all(0 <= i < n for i in tail)
    first = s.indices(0, 1000)
    assert len(set(first.tolist())) == 1000 and first.min() >= 0 and first.max() < n


# --- shard-local mode ----------------------------------------------------------------------------

SIZES = [40, 0, 33, 57, 12, 40, 40, 61, 5, 30]  # uneven, one empty shard


def _shard_of(indices, sizes):
    ends = np.cumsum(sizes)
    return np.searchsorted(ends, np.asarray(indices), side="right")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_local_covers_each_sample_once_with_equal_counts(world):
    n = sum(SIZES)
    shards = _epoch(n, world, seed=5, epoch=1, shard_sizes=SIZES)
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(n))
    assert n - len(flat) < world
    assert {len(s) for s in shards} == {n // world}
    assert shards == _epoch(n, world, seed=5, epoch=1, shard_sizes=SIZES)  # deterministic


def test_shard_local_ranks_read_their_own_shards():
    """Each rank reads a contiguous run of the shuffled shards: whole shards plus at most a part of
    one at each end, so at most W-1 shards are shared between ranks."""
    sizes, world = [25] * 24, 4  # 600 samples, 150 per rank = 6 shards each
    shards = _epoch(sum(sizes), world, seed=2, epoch=0, shard_sizes=sizes)
    touched = [set(_shard_of(s, sizes).tolist()) for s in shards]
    assert all(len(t) <= 150 // 25 + 2 for t in touched)
    assert sum(len(t) for t in touched) <= len(sizes) + world - 1
    sizes = [16] * 24  # 384 samples, 96 per rank = exactly 6 shards each: nothing shared
    shards = _epoch(sum(sizes), world, seed=2, epoch=0, shard_sizes=sizes)
    touched = [set(_shard_of(s, sizes).tolist()) for s in shards]
    assert [len(t) for t in touched] == [6] * world
    assert len(set().union(*touched)) == 24
    # and the order within a rank's shards is shuffled, not shard by shard
    assert _shard_of(shards[0], sizes).tolist() != sorted(_shard_of(shards[0], sizes).tolist())


def test_shard_local_assignment_changes_per_epoch_and_tails_differ():
    n, world = sum(SIZES), 4  # 318 = 4 * 79 + 2
    per_epoch = [_epoch(n, world, seed=9, epoch=e, shard_sizes=SIZES) for e in range(6)]
    assignments = [tuple(frozenset(_shard_of(s, SIZES).tolist()) for s in ep) for ep in per_epoch]
    assert len(set(assignments)) > 1
    # coverage over epochs: the left-out tail (< W samples) is a different one each epoch
    missed = [set(range(n)) - {i for s in ep for i in s} for ep in per_epoch]
    assert all(len(m) == n % world for m in missed)
    assert len(set().union(*missed)) > n % world
    runs = shard_runs(SIZES, 9, 0, 1, world)
    assert int(runs[1].sum()) == n // world


def test_shard_local_resumes_mid_epoch():
    n = sum(SIZES)
    s = ShardedSampler(n, 2, 3, seed=4, shard_sizes=SIZES)
    s.set_epoch(7)
    full = list(s)
    for start in (0, 1, 50, len(full)):
        fresh = ShardedSampler(n, 2, 3, seed=4, shard_sizes=SIZES)
        fresh.set_epoch(7, start=start)
        assert list(fresh) == full[start:]


def test_shard_local_rejects_sizes_that_do_not_add_up():
    with pytest.raises(ValueError, match="sum to num_samples"):
        ShardedSampler(10, 0, 2, shard_sizes=[4, 5])
    with pytest.raises(ValueError, match="always shuffles"):
        ShardedSampler(9, 0, 2, shuffle=False, shard_sizes=[4, 5])
