"""Which sample each rank reads, step by step: a seeded per-epoch shuffle over ranks, computed lazily.

No N-element permutation is ever built. The shuffle is a seeded bijection on [0, N) (`Bijection`: a
Feistel network over the next power of four >= N, with cycle walking back into [0, N)), evaluated
on demand for a chunk of positions at a time in numpy. Memory and time to the first batch do not
grow with N; a full epoch costs O(N / world_size) arithmetic per rank and O(chunk) memory.

Two modes, both pure functions of (seed, epoch, rank, world size, offset[, shard sizes]):

- global (default): the epoch's order is perm(0), perm(1), ... and rank r's j-th sample is
  perm(j * W + r). After every rank consumed J samples, the consumed set is positions [0, J*W) of
  the epoch, whatever W is (what a resume on another world size builds on). The ragged tail (the last
  N mod W positions, a different set of samples each epoch) is dropped so all ranks take the same
  number of steps.
- shard-local (`shard_sizes` given; shard s is a contiguous index range, in order): the shards are
  shuffled per epoch and laid end to end; rank r takes the contiguous run of N // W samples starting
  at r * (N // W) of that sequence, i.e. whole shards plus at most a part of one shard at each end,
  and reads them in its own seeded shuffled order. Every rank yields exactly N // W samples, every
  sample is read at most once per epoch and all but the N mod W samples at the end of the shuffled
  shard sequence (a different tail each epoch) exactly once, as in global mode. A rank touches about
  N / (W * shard size) + 2 shards per epoch instead of all of them.

The engine's exact resume calls set_epoch(epoch, start=k) to continue after the k samples this rank
already consumed in the epoch: the remaining order is the same as without a restart. No
torch.distributed here: rank and world size are handed in.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Sampler

CHUNK = 1 << 16  # positions evaluated per numpy call while iterating: O(chunk) memory per rank
_ROUNDS = 6
_MASK64 = (1 << 64) - 1
# Distinct streams keyed off the same (seed, epoch): the global order, the shard order, each rank's
# order within its shards.
_GLOBAL, _SHARDS, _LOCAL = 0, 1, 2


def _mix(z: np.ndarray) -> np.ndarray:
    """A 64-bit avalanche mixer (the splitmix64 finaliser constants); uint64 arithmetic wraps."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Bijection:
    """A seeded permutation of [0, n), evaluated pointwise: `perm(positions) -> values`.

    A balanced Feistel network on 2h-bit words (4^h >= n, so the domain is < 4n) is a bijection on
    [0, 4^h) for any round function; cycle walking (apply it again while the value is >= n) restricts
    it to a bijection on [0, n), with fewer than 4 applications expected per element.
    """

    def __init__(self, n: int, *key: int):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = int(n)
        self.half = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        # The key's length goes in too: SeedSequence alone maps (1, 2) and (1, 2, 0) to the same state.
        material = [len(key)] + [int(k) & _MASK64 for k in key]
        self.round_keys = [np.uint64(w) for w in
                           np.random.SeedSequence(material).generate_state(_ROUNDS, dtype=np.uint64)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = np.asarray(positions, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"position {int(x.max())} outside [0, {self.n})")
        y = self._feistel(x)
        out = y >= np.uint64(self.n)
        while out.any():
            y[out] = self._feistel(y[out])
            out[out] = y[out] >= np.uint64(self.n)
        return y.astype(np.int64)


def global_indices(n: int, seed: int, epoch: int, rank: int, world_size: int, start: int, stop: int,
                   shuffle: bool = True) -> np.ndarray:
    """Rank `rank`'s samples number start..stop-1 of the epoch in global mode: perm(j * W + r)."""
    positions = np.arange(start, stop, dtype=np.int64) * world_size + rank
    if not shuffle:
        return positions
    return Bijection(n, _GLOBAL, seed, epoch)(positions)


def shard_runs(shard_sizes: Sequence[int], seed: int, epoch: int, rank: int,
               world_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """This rank's share in shard-local mode as runs of consecutive sample indices: (first index of
    each run, length of each run), in shuffled shard order, lengths summing to N // W."""
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    order = Bijection(len(sizes), _SHARDS, seed, epoch)(np.arange(len(sizes)))
    ends = np.cumsum(sizes[order])  # where each shuffled shard ends in the epoch's sequence
    per_rank = int(sizes.sum()) // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    first = int(np.searchsorted(ends, lo, side="right"))
    last = int(np.searchsorted(ends, hi, side="left"))  # the shard holding position hi - 1
    starts, lengths = [], []
    for i in range(first, min(last + 1, len(order))):
        seq_begin = int(ends[i] - sizes[order[i]])
        a, b = max(lo, seq_begin), min(hi, int(ends[i]))
        if b > a:
            starts.append(int(offsets[order[i]]) + a - seq_begin)
            lengths.append(b - a)
    return np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


def shard_local_indices(shard_sizes: Sequence[int], seed: int, epoch: int, rank: int, world_size: int,
                        start: int, stop: int, runs: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> np.ndarray:
    """Rank `rank`'s samples number start..stop-1 of the epoch in shard-local mode: its runs
    (`shard_runs`, pass them in to avoid recomputing) read in a seeded shuffled order."""
    starts, lengths = runs if runs is not None else shard_runs(shard_sizes, seed, epoch, rank, world_size)
    total = int(lengths.sum())
    q = Bijection(total, _LOCAL, seed, epoch, rank)(np.arange(start, stop, dtype=np.int64))
    run_ends = np.cumsum(lengths)
    run = np.searchsorted(run_ends, q, side="right")
    return starts[run] + q - (run_ends[run] - lengths[run])


class ShardedSampler(Sampler[int]):
    """Yields this rank's sample indices for the current epoch, from `start` on, one chunk at a time.

    shard_sizes: samples per shard (shard s = the next contiguous index range) for shard-local mode;
    None for the global shuffle. shuffle=False (global mode only) gives the strided order r, r+W, ...
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int = 0, shuffle: bool = True,
                 shard_sizes: Optional[Sequence[int]] = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world size {world_size}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if shard_sizes is not None:
            if any(int(s) < 0 for s in shard_sizes) or sum(int(s) for s in shard_sizes) != num_samples:
                raise ValueError(f"shard sizes must be >= 0 and sum to num_samples {num_samples}")
            if not shuffle:
                raise ValueError("shard-local sampling always shuffles")
        self.num_samples = int(num_samples)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.shard_sizes = None if shard_sizes is None else [int(s) for s in shard_sizes]
        self.mode = "global" if shard_sizes is None else "shard-local"
        self.samples_per_rank = self.num_samples // self.world_size
        self.epoch = 0
        self.start = 0
        self._runs = None  # (epoch, shard_runs) cached for shard-local mode

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.samples_per_rank:
            raise ValueError(f"start {start} is outside this rank's epoch of {self.samples_per_rank} samples")
        self.epoch = int(epoch)
        self.start = int(start)

    def indices(self, begin: int, end: int, epoch: Optional[int] = None) -> np.ndarray:
        """This rank's samples number begin..end-1 of an epoch (default: the current one), int64,
        regardless of `start`."""
        epoch = self.epoch if epoch is None else int(epoch)
        if not 0 <= begin <= end <= self.samples_per_rank:
            raise ValueError(f"[{begin}, {end}) is outside this rank's epoch of {self.samples_per_rank} samples")
        if self.shard_sizes is None:
            return global_indices(self.num_samples, self.seed, epoch, self.rank, self.world_size,
                                  begin, end, self.shuffle)
        if self._runs is None or self._runs[0] != epoch:
            self._runs = (epoch, shard_runs(self.shard_sizes, self.seed, epoch, self.rank, self.world_size))
        return shard_local_indices(self.shard_sizes, self.seed, epoch, self.rank, self.world_size,
                                   begin, end, runs=self._runs[1])

    def epoch_indices(self) -> np.ndarray:
        """This rank's full index list for the current epoch (before `start`); for tests and small N."""
        return self.indices(0, self.samples_per_rank)

    def __iter__(self) -> Iterator[int]:
        # Bound to the epoch and start of now: a later set_epoch does not change a running iterator.
        return self._iterate(self.epoch, self.start, self.samples_per_rank)

    def _iterate(self, epoch: int, begin: int, end: int) -> Iterator[int]:
        for a in range(begin, end, CHUNK):
            yield from self.indices(a, min(a + CHUNK, end), epoch).tolist()

    def __len__(self) -> int:
        return self.samples_per_rank - self.start


# ---- weighted mixtures of data sets ----------------------------------------------------------

_MIX, _SOURCE = 3, 4


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """Samples each source gives an epoch of sum(sizes) samples: the weights' shares of it, rounded
    by largest remainder (ties to the earlier source), so the counts sum exactly to the epoch."""
    sizes = np.asarray(sizes, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    if len(w) != len(sizes) or (w <= 0).any() or not np.isfinite(w).all() or (sizes <= 0).any():
        raise ValueError(f"need one positive weight per non-empty source, got sizes {sizes.tolist()}, "
                         f"weights {w.tolist()}")
    total = int(sizes.sum())
    quota = total * w / w.sum()
    counts = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[:total - int(counts.sum())]] += 1
    return counts


def mixture_indices(sizes: Sequence[int], weights: Sequence[float], seed: int, epoch: int,
                    positions: np.ndarray) -> np.ndarray:
    """Concatenated-data-set indices (source 0's, then source 1's, ...) at `positions` of an epoch.

    The epoch's positions are dealt to the sources by a seeded bijection onto [0, N) cut into runs
    of mixture_counts, so source k gets exactly counts[k] positions. Source k's draws form one stream
    over the run: its epoch e takes stream numbers e*counts[k] .. (e+1)*counts[k]-1, and stream number
    s is sample perm_{k, s // size_k}(s % size_k), a fresh seeded permutation of the source per pass.
    A source with less weight than size is thus read without repeats across epochs; one with more
    repeats only after every sample of it was drawn. Pure in (sizes, weights, seed, epoch, positions)."""
    sizes_a = np.asarray(sizes, dtype=np.int64)
    counts = mixture_counts(sizes_a, weights)
    q = Bijection(int(counts.sum()), _MIX, seed, epoch)(np.asarray(positions, dtype=np.int64))
    ends = np.cumsum(counts)
    src = np.searchsorted(ends, q, side="right")
    stream = int(epoch) * counts[src] + q - (ends[src] - counts[src])
    cycle, within = np.divmod(stream, sizes_a[src])
    out = np.empty_like(q)
    offsets = np.concatenate([[0], np.cumsum(sizes_a)[:-1]])
    for k, c in set(zip(src.tolist(), cycle.tolist())):
        at = (src == k) & (cycle == c)
        out[at] = offsets[k] + Bijection(int(sizes_a[k]), _SOURCE, seed, k, c)(within[at])
    return out


class MixtureSampler(ShardedSampler):
    """ShardedSampler's global mode over a weighted mixture of data sets concatenated in order
    (`sizes`): rank r's j-th sample of an epoch is position j * W + r of `mixture_indices`, so
    resuming (also on another world size) continues exactly as in the global shuffle. An epoch is
    sum(sizes) samples; `source_of(indices)` says which data set each index belongs to."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], rank: int, world_size: int, seed: int = 0):
        super().__init__(int(sum(int(s) for s in sizes)), rank, world_size, seed=seed)
        self.sizes = [int(s) for s in sizes]
        self.weights = [float(w) for w in weights]
        self.counts = mixture_counts(self.sizes, self.weights)  # checks the weights
        self.mode = "mixture"
        self._ends = np.cumsum(self.sizes)

    def indices(self, begin: int, end: int, epoch: Optional[int] = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else int(epoch)
        if not 0 <= begin <= end <= self.samples_per_rank:
            raise ValueError(f"[{begin}, {end}) is outside this rank's epoch of {self.samples_per_rank} samples")
        positions = np.arange(begin, end, dtype=np.int64) * self.world_size + self.rank
        return mixture_indices(self.sizes, self.weights, self.seed, epoch, positions)

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._ends, np.asarray(indices, dtype=np.int64), side="right")
