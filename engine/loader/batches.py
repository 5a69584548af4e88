"""The training data stream: which sampler a run uses, and an epoch's micro-batches read ahead and
made ready for the device.

The batch goes one way: the loader reads uint8 images and token ids, the Prefetcher moves them (to a
GPU on a side stream), and a DeviceBatch normalises its images on the device when the step asks for
the model's inputs. The step never calls back into the trainer, and the trainer only says "give me
this epoch's batches from here on".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from data.files import InputError
from data.images.transform import normalize_uint8
from data.sampler import ShardedSampler, mixture_counts
from engine.loader.mixture import MixtureDataset, SourceShares, mixture_sampler
from engine.loader.prefetch import Prefetcher

log = logging.getLogger("clip")


def build_sampler(dataset, rank: int, world_size: int, seed: int, shard_local: bool,
                  data_name: str) -> ShardedSampler:
    """The global shuffle, or with shard_local each rank reading its own run of the dataset's shards
    (needs a dataset with `shard_pair_counts`: pairs per shard, shard s = the next index range)."""
    if isinstance(dataset, MixtureDataset):
        if shard_local:
            raise InputError("--shard-local reads each rank's own shards of one data set; a mixture of data sets "
                             "samples them all by weight: drop --shard-local")
        log.info("mixture: %s", ", ".join(f"{n} ({s} pairs, weight {w:g}, {c} samples per epoch)" for n, s, w, c
                                         in zip(dataset.names, dataset.sizes, dataset.weights,
                                                mixture_counts(dataset.sizes, dataset.weights))))
        return mixture_sampler(dataset, rank, world_size, seed)
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


@dataclass(frozen=True)
class DeviceBatch:
    """One micro-batch on the device, as the contrastive step takes it. The images stay uint8 until
    `inputs()` normalises them there (the store's mean/std, in the training precision): the exact
    step encodes every micro-batch twice and holds all k of a step in between, and uint8 is a
    quarter of the memory of fp32."""
    images: torch.Tensor     # uint8 [B, 3, R, R]
    input_ids: torch.Tensor  # long [B, L]
    mean: Sequence[float]
    std: Sequence[float]
    dtype: torch.dtype

    def inputs(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(normalised pixels, token ids): what the model's forward takes."""
        return normalize_uint8(self.images, self.mean, self.std, dtype=self.dtype), self.input_ids


class DeviceBatches:
    """An epoch's micro-batches as DeviceBatch: read ahead (and copied to a GPU) by a Prefetcher,
    placed on `device` here (a no-op where the Prefetcher already moved them). `shares` hears of every
    micro-batch handed out (the step consumes what it is handed): `(epoch, first sample, micro)`."""

    def __init__(self, batches: Prefetcher, device: torch.device, mean: Sequence[float], std: Sequence[float],
                 dtype: torch.dtype, shares: Optional[SourceShares] = None, position: Tuple[int, int, int] = (0, 0, 0)):
        self.batches, self.device = batches, device
        self.mean, self.std, self.dtype = tuple(mean), tuple(std), dtype
        self.shares, (self.epoch, self.next_sample, self.micro) = shares, position

    def __iter__(self):
        return self

    def __next__(self) -> DeviceBatch:
        b = next(self.batches)
        if self.shares is not None:
            self.shares.consumed(self.epoch, self.next_sample, self.next_sample + self.micro)
        self.next_sample += self.micro
        return DeviceBatch(b["image"].to(self.device, non_blocking=True),
                           b["input_ids"].to(self.device, non_blocking=True), self.mean, self.std, self.dtype)

    def close(self) -> None:
        self.batches.close()


def device_batches(dataset, sampler: ShardedSampler, epoch: int, start_sample: int, micro_batch: int,
                   num_workers: int, seed: int, device: torch.device, images, dtype: torch.dtype, depth: int,
                   timeout_s: float, shares: Optional[SourceShares] = None) -> DeviceBatches:
    """epoch_batches, made ready for the device; `images` is what holds the images (its .mean/.std
    say how they normalise); `shares` counts the sources of what is consumed. Close it (or let the
    epoch end) when done."""
    return DeviceBatches(epoch_batches(dataset, sampler, epoch, start_sample, micro_batch, num_workers, seed,
                                       device, depth, timeout_s), device, images.mean, images.std, dtype,
                         shares, (epoch, start_sample, micro_batch))
