"""One rank of the sampler test: writes the indices its sampler yields, through a DataLoader as the
trainer uses it, for a full epoch and for a restart mid-epoch.

argv: out_dir num_samples seed epoch start batch_size [shard sizes, comma-separated, for shard-local]
"""
import json
import os
import sys

import torch
from torch.utils.data import DataLoader, Dataset

from data.sampler import ShardedSampler


class Indices(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def main():
    out_dir, n, seed, epoch, start, batch = sys.argv[1], *map(int, sys.argv[2:7])
    sizes = [int(s) for s in sys.argv[7].split(",")] if len(sys.argv) > 7 else None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    sampler = ShardedSampler(n, rank, world, seed=seed, shard_sizes=sizes)
    loader = DataLoader(Indices(n), batch_size=batch, sampler=sampler, num_workers=1)
    sampler.set_epoch(epoch)
    full = [int(i) for b in loader for i in b]
    # A fresh process state, as after a restart: a new sampler told where this rank stopped.
    restarted = ShardedSampler(n, rank, world, seed=seed, shard_sizes=sizes)
    restarted.set_epoch(epoch, start=start)
    rest = [int(i) for b in DataLoader(Indices(n), batch_size=batch, sampler=restarted) for i in b]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"full": full, "rest": rest, "len": len(sampler), "torch": torch.__version__}, f)


if __name__ == "__main__":
    main()
