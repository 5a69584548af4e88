"""The mixture sampler (data.sampler.MixtureSampler, mixture_indices): exact weighted shares,
determinism, exact resume (also on another world size), and each source read without repeats
within a pass. Flags: engine.loader.mixture.parse_train_data."""
import numpy as np
import pytest

from data.files import InputError
from data.sampler import MixtureSampler, mixture_counts, mixture_indices
from engine.loader.mixture import parse_train_data

SIZES = [3000, 1000]  # concatenated: source 0 is [0, 3000), source 1 is [3000, 4000)


def _all_ranks(sizes, weights, world, epoch, seed=7):
    out = []
    for r in range(world):
        s = MixtureSampler(sizes, weights, r, world, seed=seed)
        s.set_epoch(epoch)
        out.append(s.epoch_indices())
    return out


def test_shares_over_three_epochs_at_1_to_3_are_within_1_percent_of_25_75():
    seen = np.zeros(2, dtype=np.int64)
    for epoch in range(3):
        for idx in _all_ranks(SIZES, [1, 3], world=3, epoch=epoch):
            seen += np.bincount(np.searchsorted(np.cumsum(SIZES), idx, side="right"), minlength=2)
    share = seen / seen.sum()
    assert abs(share[0] - 0.25) < 0.01 and abs(share[1] - 0.75) < 0.01, share
    assert seen.sum() == 3 * (sum(SIZES) // 3) * 3  # every rank takes floor(N / W) per epoch


def test_counts_are_the_weights_shares_of_the_epoch():
    assert mixture_counts([3000, 1000], [1, 3]).tolist() == [1000, 3000]
    assert mixture_counts([7, 5, 3], [1, 1, 1]).tolist() == [5, 5, 5]
    assert mixture_counts([10, 1], [2, 1]).tolist() == [7, 4]  # 7.33 / 3.67: the larger remainder gets the extra
    for bad in ([0, 1], [1, -1], [1, float("nan")]):
        with pytest.raises(ValueError):
            mixture_counts([5, 5], bad)


def test_the_epoch_is_the_strided_split_of_one_sequence_whatever_the_world_size():
    # One order per (seed, epoch): rank r of W takes positions r, r + W, ... of it.
    one = _all_ranks(SIZES, [1, 3], world=1, epoch=2)[0]
    for world in (2, 3, 5):
        ranks = _all_ranks(SIZES, [1, 3], world=world, epoch=2)
        n = len(ranks[0])
        assert all(len(r) == n for r in ranks)
        strided = np.stack(ranks, axis=1).reshape(-1)
        assert np.array_equal(strided, one[: n * world])
    assert not np.array_equal(one, _all_ranks(SIZES, [1, 3], world=1, epoch=3)[0])  # a new order each epoch


def test_resume_mid_epoch_continues_the_same_sequence():
    s = MixtureSampler(SIZES, [1, 3], 1, 2, seed=3)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, start=777)
    assert list(s) == full[777:] and len(s) == len(full) - 777
    # on another world size: after 776 samples on each of 2 ranks, 4 ranks continue at 776 * 2 / 4 each
    consumed = np.concatenate([r[:776] for r in _all_ranks(SIZES, [1, 3], 2, 1, seed=3)])
    rest = np.concatenate([r[776 * 2 // 4:] for r in _all_ranks(SIZES, [1, 3], 4, 1, seed=3)])
    uninterrupted = _all_ranks(SIZES, [1, 3], 1, 1, seed=3)[0]
    assert sorted(consumed.tolist()) == sorted(uninterrupted[:776 * 2].tolist())
    assert sorted(rest.tolist()) == sorted(uninterrupted[776 * 2:].tolist())


def test_each_source_is_read_once_per_pass_before_any_sample_repeats():
    sizes = [50, 20]
    draws = {0: [], 1: []}
    for epoch in range(6):  # weights 1:3 of 70: source 0 gives 18 per epoch, source 1 gives 52
        pos = np.arange(sum(sizes))
        idx = mixture_indices(sizes, [1, 3], 11, epoch, pos)
        src = (idx >= sizes[0]).astype(int)
        for k in (0, 1):  # in stream order: by position within the epoch is not the stream order, so sort
            draws[k].append(np.sort(idx[src == k] - (sizes[0] if k else 0)))
    small = np.concatenate(draws[1])  # 6 x 52 = 312 draws of 20 samples: 15 full passes and a part
    counts = np.bincount(small, minlength=20)
    assert counts.max() - counts.min() <= 1  # over-weighted: evenly repeated
    big = np.concatenate(draws[0])  # 6 x 18 = 108 draws of 50: the first 100 are one permutation each pass
    assert np.bincount(big, minlength=50).max() <= 3 and np.bincount(big, minlength=50).min() >= 2


def test_the_order_is_a_pure_function_of_its_inputs():
    a = mixture_indices(SIZES, [1, 3], 5, 4, np.arange(100, 200))
    b = mixture_indices(SIZES, [1, 3], 5, 4, np.arange(100, 200))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, mixture_indices(SIZES, [1, 3], 6, 4, np.arange(100, 200)))
    assert not np.array_equal(a, mixture_indices(SIZES, [1, 2], 5, 4, np.arange(100, 200)))


def test_train_data_flags_parse_to_paths_and_weights():
    assert parse_train_data(["a", "b"], "1,3") == [("a", 1.0), ("b", 3.0)]
    assert parse_train_data(["a::1", "b::0.5"], None) == [("a", 1.0), ("b", 0.5)]
    assert parse_train_data(["a", "b"], None) == [("a", 1.0), ("b", 1.0)]
    assert parse_train_data("a", None) == [("a", 1.0)]
    for values, weights, message in ((["a", "b"], "1", "1 weight"), (["a::1", "b"], None, "to every"),
                                     (["a::x"], None, "positive number"), (["a::1", "b::2"], "1,2", "not both"),
                                     (["a", "b"], "1,-2", "positive number")):
        with pytest.raises(InputError, match=message):
            parse_train_data(values, weights)
