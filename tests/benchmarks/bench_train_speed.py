"""Training speed options through `launch/train.py` on the CPU demo model: ranks x threads, --compile.

  python tests/benchmarks/bench_train_speed.py                              # 1x1 1x2 2x1 2x2 1xauto 2xauto
  python tests/benchmarks/bench_train_speed.py --configs 1x1 1x1+compile --steps 80

A config is RANKSxTHREADS: THREADS is passed as --threads, or "auto" (no --threads and no
OMP_NUM_THREADS: the trainer chooses, engine/train/threads.py); "+compile" adds --compile. 2 ranks go through
DeepSpeed's launcher. Each run is one process tree on the bench_patch_dropout data (demo model,
ds_configs/cpu_demo_zero2_fp32.json, micro batch 64 per rank, so 2 ranks train on 128 per step);
the configs run in turn, --rounds times. samples/s (all ranks together) is the median of the
10-step log windows after the first; the first window holds the start of training (and, with
--compile, the compilation), so its extra seconds are printed too, and the whole run's wall time.
--compile runs start from an empty inductor cache unless --warm-cache.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.bench_patch_dropout import ENV, build_data, train  # noqa: E402


def run_config(work: Path, config: str, steps: int, warm_cache: bool) -> dict:
    shape, _, option = config.partition("+")
    ranks, threads = shape.split("x")
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    extra = [] if threads == "auto" else ["--threads", threads]
    with tempfile.TemporaryDirectory(prefix="inductor_") as cache:
        if option == "compile":
            extra.append("--compile")
            if not warm_cache:  # the cost of a first run: inductor starts from an empty cache
                env["TORCHINDUCTOR_CACHE_DIR"] = cache
        r = train(work, 0.0, steps, 1, f"speed_{config}", extra=extra, ranks=int(ranks), env=env)
    w = r["windows"]
    steady = statistics.median(w[1:])
    batch = 64 * int(ranks)
    # seconds the first window took beyond 10 steady steps
    r.update(config=config, steady=steady, first_extra_s=10 * batch / w[0] - 10 * batch / steady)
    return r


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1", "2x2", "1xauto", "2xauto"])
    a.add_argument("--steps", type=int, default=60)
    a.add_argument("--rounds", type=int, default=1)
    a.add_argument("--warm-cache", action="store_true",
                   help="--compile runs keep inductor's usual cache (default: an empty one per run)")
    a.add_argument("--work", default="/tmp/bench_patch_dropout", help="data (built there if missing)")
    args = a.parse_args()
    work = Path(args.work)
    build_data(work, 6000, 600)
    results = {c: [] for c in args.configs}
    for _ in range(args.rounds):
        for c in args.configs:
            results[c].append(run_config(work, c, args.steps, args.warm_cache))
            r = results[c][-1]
            print(f"{c}: windows {[round(x, 1) for x in r['windows']]} threads {r['threads']} "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"\n| ranks x threads | threads chosen (log) | samples/s, all ranks (median of windows 2+) | "
          f"first window's extra s | whole run s |\n|---|---|---|---|---|")
    for c, rs in results.items():
        steady = ", ".join(f"{r['steady']:.0f}" for r in rs)
        extra = ", ".join(f"{r['first_extra_s']:.1f}" for r in rs)
        wall = ", ".join(f"{r['wall_s']:.0f}" for r in rs)
        print(f"| {c} | {rs[0]['threads']} | {steady} | {extra} | {wall} |")
    print(f"\nload average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
