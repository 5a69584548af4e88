"""The training data stream: which sampler a run uses, and an epoch's micro-batches read ahead.

Kept out of trainer.py so the run loop only says "give me this epoch's batches from here on".
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from data.files import InputError
from data.sampler import ShardedSampler
from engine.loader.prefetch import Prefetcher

log = logging.getLogger("clip")


def build_sampler(dataset, rank: int, world_size: int, seed: int, shard_local: bool,
                  data_name: str) -> ShardedSampler:
    """The global shuffle, or with shard_local each rank reading its own run of the dataset's shards
    (needs a dataset with `shard_pair_counts`: pairs per shard, shard s = the next index range)."""
    if not shard_local:
        return ShardedSampler(len(dataset), rank, world_size, seed=seed, shuffle=True)
    sizes = getattr(dataset, "shard_pair_counts", None)
    if sizes is None:
        raise InputError(f"--shard-local: {data_name} is not a sharded dataset; build one with "
                         "launch/build_dataset.py (or drop --shard-local for the global shuffle)")
    sizes = [int(s) for s in sizes]
    if sum(sizes) != len(dataset) or min(sizes, default=0) < 0:
        raise InputError(f"--shard-local: {data_name}: its shard pair counts add up to {sum(sizes)}, but it "
                         f"holds {len(dataset)} pairs; the dataset's manifest is inconsistent")
    log.info("shard-local sampling: %d shards, each rank reads about %.1f of them per epoch", len(sizes),
             min(len(sizes), len(sizes) / world_size + 1))
    return ShardedSampler(len(dataset), rank, world_size, seed=seed, shuffle=True, shard_sizes=sizes)


def epoch_batches(dataset, sampler: ShardedSampler, epoch: int, start_sample: int, micro_batch: int,
                  num_workers: int, seed: int, device: Optional[torch.device], depth: int,
                  timeout_s: float) -> Prefetcher:
    """This rank's micro-batches of `epoch` after the `start_sample` it already consumed, read
    `depth` batches ahead in a background thread. Close it (or let the epoch end) when done."""
    sampler.set_epoch(epoch, start=start_sample)
    # Its own generator: creating a loader must not draw from the global RNG (exact resume).
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    # pin_memory=False: the prefetch thread pins (on CUDA) right before its side-stream copy.
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch, sampler=sampler, drop_last=True,
                                         num_workers=num_workers, generator=g, pin_memory=False,
                                         persistent_workers=False)
    return Prefetcher(loader, device, depth=depth, timeout_s=timeout_s, name=f"prefetch-epoch{epoch}")
