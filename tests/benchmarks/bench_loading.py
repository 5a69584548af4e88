"""Benchmark of the training data path (CPU): does loading show in the step time, and what does the
sampler cost at scale?

1. Loading: one process, a DeepSpeed engine (the demo's ZeRO-2 fp32 config) and the trainer's step
   (engine.train.step.ContrastiveStep with the trainer's uint8 -> normalised preparation), on real
   synthetic data in our LMDB. Per step time with
     memory:   pre-made in-memory micro-batches (no loading at all: the floor),
     serial:   next() on a DataLoader in series with the step (the trainer before engine.loader.prefetch),
     prefetch: engine.loader.batches.epoch_batches (the trainer now: a background thread reads ahead).
   The three run interleaved step by step (the order rotating each step) on the same engine and the
   same sample order, so drift in machine load hits all alike; the table gives the median step.
2. Sampler: for N = 1M, 10M, 100M samples on W ranks, the time and peak RSS (in a fresh process each,
   above the RSS after imports) to produce rank 0's first micro-batch of indices and to iterate all
   of rank 0's indices of an epoch, with the seed's sampler (torch.randperm(N) on every rank) and
   data.sampler.ShardedSampler (a Feistel bijection evaluated in chunks).

  python tests/benchmarks/bench_loading.py                         # both parts, 64 px demo model
  python tests/benchmarks/bench_loading.py --part loading --resolution 224
  python tests/benchmarks/bench_loading.py --part sampler --sizes 1e6 1e7 1e8 --world 8
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

# a small ViT for 224 px images (49 patches), so that the images cost more to load than at 64 px
VIT_224 = {"embed_dim": 128, "image_resolution": 224, "vision_layers": 4, "vision_width": 128,
           "vision_patch_size": 32, "vision_heads": 4, "act": "quick_gelu"}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- 1. loading ------------------------------------------------------------------------------------

def _dataset(root: Path, images: int, resolution: int):
    from data.images.build_store import build_store
    from data.images.datasets import PairDataset
    from data.images.store import ImageStore
    from data.queries import read_queries, training_pairs
    from data.synthetic import make_synthetic
    from data.tokenizer import load_tokenizer

    make_synthetic(root, seed=0, sizes={"train": images, "valid": 4, "test": 4}, image_size=64, workers=1,
                   progress=False)
    build_store(root / "train_imgs.tsv", root / "lmdb", resolution, workers=1, progress=False)
    store = ImageStore(root / "lmdb")
    pairs = training_pairs(read_queries(root / "train_queries.jsonl"))
    return PairDataset(pairs, store, load_tokenizer(root / "vocab.txt"), 16), store


def loading(resolution: int, images: int, steps: int, warmup: int) -> dict:
    import torch

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    from tests.ranks import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    from engine.loader.batches import DeviceBatch
    from data.sampler import ShardedSampler
    from engine import dist
    from engine.train.step import ContrastiveStep
    from engine.train.ds_settings import load_ds_settings
    from engine.loader.batches import epoch_batches
    from engine.train.optim import build_optimizer, param_groups, scheduler_factory
    from models import ClipLoss, build_clip

    dist.init_distributed(use_deepspeed=True, always=True)
    import deepspeed

    with tempfile.TemporaryDirectory() as tmp:
        vision = "ViT-demo-64"
        if resolution != 64:
            vision = str(Path(tmp) / "vit224.json")
            Path(vision).write_text(json.dumps(dict(VIT_224, image_resolution=resolution)))
        t0 = time.perf_counter()
        dataset, store = _dataset(Path(tmp) / "data", images, resolution)
        build_s = time.perf_counter() - t0
        ds = load_ds_settings(str(REPO / "ds_configs" / "cpu_demo_zero2_fp32.json"), 1, False)
        micro = ds.micro_batch
        n_batches = warmup + steps
        if len(dataset) < micro * n_batches:  # serial and prefetch each read the epoch from its start
            raise SystemExit(f"{len(dataset)} pairs < {micro * n_batches} needed; raise --images")
        torch.manual_seed(0)
        model = build_clip(vision, "BERT-demo", vocab_size=len(dataset.tokens.unique()) + 1000)
        opt, _ = build_optimizer(param_groups(model, 0.1), 1e-4, on_gpu=False, offload=False)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds.for_engine(),
                                          lr_scheduler=scheduler_factory(10, 10 ** 6), dist_init_required=False)

        def ready(b):  # what the trainer's loader hands the step
            return DeviceBatch(b["image"], b["input_ids"], store.mean, store.std, torch.float32)

        stepper = ContrastiveStep(engine, ClipLoss(gather=dist.all_gather_with_grad), 1)
        def loader():
            sampler = ShardedSampler(len(dataset), 0, 1, seed=0)
            sampler.set_epoch(0)
            return torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=sampler, drop_last=True)

        in_memory = list(islice(loader(), n_batches))
        sources = {"memory": iter(in_memory), "serial": iter(loader()),
                   "prefetch": epoch_batches(dataset, ShardedSampler(len(dataset), 0, 1, seed=0), 0, 0, micro,
                                             0, 0, None, depth=2, timeout_s=300)}
        times = {k: [] for k in sources}
        names = list(sources)
        for s in range(n_batches):
            for k in names[s % 3:] + names[: s % 3]:  # rotate who goes first
                t = time.perf_counter()
                stepper.run([ready(next(sources[k]))])
                if s >= warmup:
                    times[k].append(time.perf_counter() - t)
        sources["prefetch"].close()
        # the loader alone, for scale
        t = time.perf_counter()
        for _ in islice(loader(), n_batches):
            pass
        read_s = (time.perf_counter() - t) / n_batches
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": f"{Path(vision).stem} + BERT-demo", "resolution": resolution, "micro_batch": micro,
            "steps": steps, "threads": torch.get_num_threads(), "store_build_s": build_s,
            "read_ms": 1000 * read_s, **{f"{k}_ms": 1000 * v for k, v in med.items()},
            "serial_ratio": med["serial"] / med["memory"], "prefetch_ratio": med["prefetch"] / med["memory"],
            "mean_ms": {k: round(1000 * statistics.mean(v), 1) for k, v in times.items()},
            "min_ms": {k: round(1000 * min(v), 1) for k, v in times.items()}}


# --- 2. sampler ------------------------------------------------------------------------------------

def _randperm_indices(n: int, rank: int, world: int, seed: int, epoch: int):
    """The seed's ShardedSampler.__iter__ (before issue 9), for comparison."""
    import torch

    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)[: (n // world) * world]
    return iter(perm[rank::world].tolist())


def _sampler_one(impl: str, n: int, world: int, batch: int) -> dict:
    """In a fresh process: time and peak RSS for rank 0's first batch, then for its whole epoch."""
    import torch  # noqa: F401  (both implementations import it; keep it out of the measurement)

    from data.sampler import ShardedSampler

    base = _rss_mb()
    t0 = time.perf_counter()
    if impl == "randperm":
        it = _randperm_indices(n, 0, world, 0, 1)
    else:
        s = ShardedSampler(n, 0, world, seed=0)
        s.set_epoch(1)
        it = iter(s)
    first = list(islice(it, batch))
    first_s = time.perf_counter() - t0
    first_rss = _peak_rss_mb() - base
    count = len(first)
    for _ in it:
        count += 1
    return {"impl": impl, "n": n, "world": world, "first_batch_s": first_s, "first_batch_rss_mb": first_rss,
            "epoch_s": time.perf_counter() - t0, "epoch_rss_mb": _peak_rss_mb() - base, "count": count}


def sampler(sizes, world: int, batch: int, skip_randperm_above: float) -> list:
    rows = []
    for n in sizes:
        for impl in ("randperm", "bijection"):
            if impl == "randperm" and n > skip_randperm_above:
                rows.append({"impl": impl, "n": n, "world": world, "skipped": True})
                continue
            out = subprocess.run([sys.executable, __file__, "--part", "_sampler_one", "--impl", impl,
                                  "--n", str(int(n)), "--world", str(world), "--batch", str(batch)],
                                 capture_output=True, text=True, timeout=1800)
            if out.returncode:
                rows.append({"impl": impl, "n": n, "world": world, "error": out.stderr[-300:]})
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            assert rows[-1]["count"] == int(n) // world, rows[-1]
    return rows


# --- main ------------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "loading", "sampler", "_sampler_one"), default="all")
    p.add_argument("--resolution", type=int, default=64, help="64: the demo ViT; other: a small ViT/32")
    p.add_argument("--images", type=int, default=None, help="synthetic images (default: enough for the steps)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    p.add_argument("--world", type=int, default=8, help="ranks the sampler part splits over")
    p.add_argument("--batch", type=int, default=256, help="micro-batch of the sampler part")
    p.add_argument("--skip-randperm-above", type=float, default=1e8)
    p.add_argument("--impl", default="bijection")
    p.add_argument("--n", type=int, default=0)
    a = p.parse_args()

    if a.part == "_sampler_one":
        print(json.dumps(_sampler_one(a.impl, a.n, a.world, a.batch)))
        return 0
    if a.part in ("all", "loading"):
        # queries have ~1.3 pairs per image in the synthetic set; 64 rows per micro-batch
        images = a.images or 64 * (a.steps + a.warmup)
        r = loading(a.resolution, images, a.steps, a.warmup)
        print(f"\n## Loading: {r['model']}, {r['resolution']} px, micro-batch {r['micro_batch']}, "
              f"{r['threads']} thread(s), median of {r['steps']} interleaved steps per mode")
        print("| batches from | ms/step | x in-memory |\n|---|---:|---:|")
        print(f"| in-memory (no loading) | {r['memory_ms']:.1f} | 1.00 |")
        print(f"| DataLoader in series (before) | {r['serial_ms']:.1f} | {r['serial_ratio']:.3f} |")
        print(f"| engine.loader.prefetch (now) | {r['prefetch_ms']:.1f} | {r['prefetch_ratio']:.3f} |")
        print(f"\nreading alone: {r['read_ms']:.1f} ms per micro-batch; mean ms/step {r['mean_ms']}, "
              f"min {r['min_ms']}")
    if a.part in ("all", "sampler"):
        rows = sampler(a.sizes, a.world, a.batch, a.skip_randperm_above)
        print(f"\n## Sampler: rank 0 of {a.world}, micro-batch {a.batch}; RSS above the process after imports")
        print("| N | sampler | first batch s | first batch MB | epoch s | epoch peak MB |\n|---:|---|---:|---:|---:|---:|")
        for r in rows:
            if "first_batch_s" not in r:
                print(f"| {r['n']:.0e} | {r['impl']} | {'skipped' if r.get('skipped') else 'failed'} | | | |")
                continue
            print(f"| {r['n']:.0e} | {r['impl']} | {r['first_batch_s']:.3f} | {r['first_batch_rss_mb']:.0f} | "
                  f"{r['epoch_s']:.1f} | {r['epoch_rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
