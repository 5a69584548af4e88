"""Shards samples over ranks with a seeded per-epoch shuffle, and can start mid-epoch.

Every rank builds the same permutation from seed + epoch, drops the ragged tail (fewer than
world_size samples) so all ranks take the same number of steps, and takes every world_size-th index
from its rank on. The engine's exact resume calls set_epoch(epoch, start=k) to continue after the
k samples this rank already consumed in the epoch: the remaining order is the same as without a
restart. No torch.distributed here: rank and world size are handed in.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int = 0, shuffle: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world size {world_size}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = int(num_samples)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.samples_per_rank = self.num_samples // self.world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.samples_per_rank:
            raise ValueError(f"start {start} is outside this rank's epoch of {self.samples_per_rank} samples")
        self.epoch = int(epoch)
        self.start = int(start)

    def epoch_indices(self) -> torch.Tensor:
        """This rank's full index list for the current epoch (before `start` is applied)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.num_samples, generator=g)
        else:
            perm = torch.arange(self.num_samples)
        perm = perm[: self.samples_per_rank * self.world_size]
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start :].tolist())

    def __len__(self) -> int:
        return self.samples_per_rank - self.start
