"""Benchmark of the training recipes (CPU).

1. siglip: the sigmoid loss's peak tensor memory per rank and its time (forward + backward of the loss
   alone), at equal local batch on 2, 4 and 8 gloo ranks: ours (models.sigmoid_loss through
   engine.dist.visit_blocks, ring and gather) against open_clip 3.3's SigLipLoss (its default "bidir"
   neighbour exchange, and its "gather"). Memory is every CPU tensor alive at once while the loss
   runs, from torch.profiler's memory timeline (tests/oracles.py); time is the median of --repeats
   calls without the profiler, the slowest rank's. W ranks share this machine's cores, so the
   times grow with W here for everyone; the memory is what a rank of a real cluster would hold.
2. lock: the training step's time (DeepSpeed ZeRO-0 fp32 + engine.train.step.ContrastiveStep, one
   process) with the image tower locked, and with both towers locked, against the same model
   unlocked, taking turns step by step on the same batches, at two batch sizes.

  python tests/benchmarks/bench_recipes.py                     # both parts, Markdown tables
  python tests/benchmarks/bench_recipes.py --part siglip --rows 512 --dim 256 --worlds 2,4,8
  python tests/benchmarks/bench_recipes.py --part lock --batches 64,128 --steps 12
  python tests/benchmarks/bench_recipes.py --smoke             # tiny sizes, seconds (tests/e2e)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

IMPLS = ("ours_ring", "ours_gather", "open_clip_bidir", "open_clip_gather")


def _loss_fn(impl: str, rank: int, world: int, chunk=None):
    from engine import dist
    from models.sigmoid_loss import SigmoidLoss

    if impl.startswith("ours_"):
        how = impl.split("_")[1]
        return SigmoidLoss(lambda t, f, g: dist.visit_blocks(t, f, g, how=how), rank, chunk)
    from open_clip.loss import SigLipLoss

    return SigLipLoss(rank=rank, world_size=world, dist_impl=impl.split("_")[-1])


def _siglip_rank(rows: int, dim: int, repeats: int, out: str, chunk=None) -> None:
    """One rank of part 1 (run by run_ranks)."""
    import torch
    from torch.nn import functional as F

    from engine import dist
    from tests.oracles import peak_tensor_bytes

    dist.init_distributed(use_deepspeed=False, always=True, timeout_s=600)
    rank, world = dist.rank(), dist.world_size()
    g = torch.Generator().manual_seed(rank)
    images = F.normalize(torch.randn(rows, dim, generator=g), dim=-1).requires_grad_(True)
    texts = F.normalize(torch.randn(rows, dim, generator=g), dim=-1).requires_grad_(True)
    scale, bias = torch.tensor([10.0], requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    res = {}
    for impl in IMPLS:
        try:
            loss_fn = _loss_fn(impl, rank, world, chunk)
        except ImportError:
            continue

        def once():
            loss_fn(images, texts, scale, bias).backward()

        once()  # warm-up (and the gloo pairs' first connection)
        peak = peak_tensor_bytes(once)
        seconds = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            once()
            seconds.append(time.perf_counter() - t0)
        res[impl] = {"peak_bytes": peak, "seconds": statistics.median(seconds)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))


def siglip(rows: int, dim: int, worlds, repeats: int, chunk=None) -> list:
    from tests.ranks import assert_all_ok, run_ranks

    table = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as out:
            argv = [__file__, "--part", "_siglip_rank", "--rows", str(rows), "--dim", str(dim), "--repeats",
                    str(repeats), "--out", out] + (["--chunk", str(chunk)] if chunk else [])
            assert_all_ok(run_ranks(argv, world_size=world, timeout=1800))
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
        for impl in ranks[0]:
            table.append({"world": world, "impl": impl, "rows": rows, "dim": dim, "chunk": chunk,
                          "peak_mb": max(r[impl]["peak_bytes"] for r in ranks) / 2 ** 20,
                          "ms": 1000 * max(r[impl]["seconds"] for r in ranks)})
    return table


def lock(batches, steps: int, warmup: int) -> list:
    """Part 2: step time locked / unlocked, one process."""
    import torch

    from engine import dist
    from engine.train.optim import build_optimizer, param_groups
    from engine.train.step import ContrastiveStep
    from models import ClipLoss, build_clip
    from models.towers import lock_tower
    from tests.benchmarks.bench_engine import _batches, _device_batch, time_interleaved

    dist.init_distributed(use_deepspeed=True, always=True)
    import deepspeed

    vision, text = "ViT-demo-64", "BERT-demo"
    rows = []
    for batch in batches:
        data = _batches(vision, text, batch, steps + warmup)

        def stepper(locks):
            torch.manual_seed(0)
            model = build_clip(vision, text)
            for tower in locks:
                lock_tower(model, tower)
            opt, _ = build_optimizer(param_groups(model, 0.001), 1e-4, on_gpu=False, offload=False)
            cfg = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
                   "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
            step = ContrastiveStep(engine, ClipLoss(), 1)
            return lambda b: step.run([_device_batch(b)])

        times = time_interleaved({"unlocked": stepper(()), "image locked": stepper(("image",)),
                                  "both locked": stepper(("image", "text"))}, data, warmup, 1)
        base = statistics.median(times["unlocked"])
        for name, t in times.items():
            rows.append({"batch": batch, "variant": name, "ms": 1000 * statistics.median(t),
                         "spread_ms": 1000 * (max(t) - min(t)) / 2, "vs_unlocked": statistics.median(t) / base,
                         "steps": len(t)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "siglip", "lock", "_siglip_rank"), default="all")
    p.add_argument("--rows", type=int, default=512, help="siglip: rows (local batch) per rank")
    p.add_argument("--dim", type=int, default=256, help="siglip: feature size")
    p.add_argument("--chunk", type=int, default=None, help="siglip: our loss's text rows per chunk (default: a rank's)")
    p.add_argument("--worlds", default="2,4,8", help="siglip: world sizes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", default="64,128", help="lock: batch sizes")
    p.add_argument("--steps", type=int, default=12, help="lock: timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    p.add_argument("--out", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    if a.part == "_siglip_rank":
        _siglip_rank(a.rows, a.dim, a.repeats, a.out, a.chunk)
        return 0
    if a.smoke:
        a.rows, a.dim, a.worlds, a.repeats, a.batches, a.steps, a.warmup = 16, 8, "2", 1, "8", 2, 1
    results = {"load_average_start": os.getloadavg()}
    if a.part in ("all", "siglip"):
        table = results["siglip"] = siglip(a.rows, a.dim, [int(w) for w in a.worlds.split(",")], a.repeats, a.chunk)
        print(f"\nsigmoid loss, forward + backward, {a.rows} rows x {a.dim} per rank, our chunks of "
              f"{a.chunk or a.rows} text rows (peak: the most CPU tensor "
              "memory alive at once on any rank; time: the slowest rank's median)\n\n"
              "| ranks | loss | peak MB per rank | ms |\n|---|---|---|---|")
        for r in table:
            print(f"| {r['world']} | {r['impl']} | {r['peak_mb']:.2f} | {r['ms']:.1f} |")
    if a.part in ("all", "lock"):
        rows = results["lock"] = lock([int(b) for b in a.batches.split(",")], a.steps, a.warmup)
        print("\nstep time, ViT-demo-64 + BERT-demo, ZeRO-0 fp32, one process, turns taken step by step\n\n"
              "| batch | towers | ms per step (median) | half range | vs unlocked |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['batch']} | {r['variant']} | {r['ms']:.1f} | {r['spread_ms']:.1f} | {r['vs_unlocked']:.2f} |")
    results["load_average_end"] = os.getloadavg()
    print(f"\nload average {' '.join(f'{v:.2f}' for v in results['load_average_start'])} at the start, "
          f"{' '.join(f'{v:.2f}' for v in results['load_average_end'])} at the end")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
