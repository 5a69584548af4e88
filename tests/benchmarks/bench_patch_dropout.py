"""Patch dropout on the CPU demo model: step time at each P, then valid recall at equal wall time.

  python tests/benchmarks/bench_patch_dropout.py --seconds 90          # P = 0, 0.5, 0.75
  python tests/benchmarks/bench_patch_dropout.py --ps 0 0.5 --seconds 60 --work /tmp/pd

Data: launch/make_synthetic.py + launch/build_lmdb.py at small sizes (built once under --work). Each
run is one `python launch/train.py` process (1 rank, the demo model and ds_configs/cpu_demo_zero2_fp32.json).
Phase 1 measures samples/s per P over --probe-steps steps; phase 2 gives each P the step count that
fits --seconds at that speed (and a schedule that ends there) and reads the final validation.
The machine is shared: runs are interleaved, and the numbers are noisy.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore",
           MALLOC_MMAP_THRESHOLD_="4294967296", MALLOC_TRIM_THRESHOLD_="68719476736")


def build_data(work: Path, train_images: int, valid_images: int) -> Path:
    data = work / "data"
    if not (work / "lmdb" / "valid").is_dir():
        subprocess.run([sys.executable, "launch/make_synthetic.py", "--out", str(data), "--train-images",
                        str(train_images), "--valid-images", str(valid_images), "--test-images", "20"],
                       cwd=REPO, env=ENV, check=True, capture_output=True)
        for split in ("train", "valid"):
            subprocess.run([sys.executable, "launch/build_lmdb.py", "--input", str(data / f"{split}_imgs.tsv"),
                            "--output", str(work / "lmdb" / split), "--resolution", "64"],
                           cwd=REPO, env=ENV, check=True, capture_output=True)
    return data


def train(work: Path, p: float, steps: int, epochs: int, name: str, extra=(), ranks: int = 1,
          env=None) -> dict:
    """One `launch/train.py` run of the demo model on the data under `work`; `extra`: more flags,
    `ranks` > 1: through DeepSpeed's launcher (same interpreter), `env`: the environment (default ENV).
    Returns samples/s (all ranks together) per logged window, their mean after the first, the final
    valid recall and the intra-op threads the run chose."""
    data = work / "data"
    launcher = ["-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                "--master_port", str(29600 + os.getpid() % 300)] if ranks > 1 else []
    cmd = [sys.executable, *launcher, "launch/train.py", "--deepspeed_config",
           "ds_configs/cpu_demo_zero2_fp32.json",
           "--model", "ViT-demo-64", "--text-model", "BERT-demo", "--vocab", str(data / "vocab.txt"),
           "--train-data", str(data / "train_queries.jsonl"), "--train-img", str(work / "lmdb" / "train"),
           "--val-data", str(data / "valid_queries.jsonl"), "--val-img", str(work / "lmdb" / "valid"),
           "--epochs", str(epochs), "--max-steps", str(steps), "--lr", "1e-3", "--wd", "0.1",
           "--warmup", str(min(100, steps // 10)), "--context-length", "16", "--save-frequency", "0",
           "--val-every-steps", str(10 ** 9), "--log-every-steps", "10", "--logs", str(work / "runs"),
           "--name", f"{name}-{time.strftime('%H%M%S')}-{os.getpid()}",  # runs never reuse a run dir
           "--patch-dropout", str(p), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=ENV if env is None else env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(out[-3000:])
    rates = [float(x) for x in re.findall(r"([\d.]+) samples/s", out)]
    mr = re.findall(r"mean recall ([\d.]+) \(R@1 ([\d.]+)", out)
    steady = rates[1:] or rates  # the first window holds warm-up
    spe = re.search(r"(\d+) steps/epoch", out)
    threads = re.search(r"intra-op threads per rank: (\d+ \(.*?\))", out)
    return {"p": p, "steps": steps, "wall_s": wall, "samples_s": sum(steady) / len(steady), "windows": rates,
            "mean_recall": float(mr[-1][0]) if mr else None, "r1": float(mr[-1][1]) if mr else None,
            "steps_per_epoch": int(spe.group(1)), "threads": threads.group(1) if threads else None}


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--ps", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    a.add_argument("--seconds", type=float, default=90, help="training time per P in phase 2")
    a.add_argument("--probe-steps", type=int, default=40)
    a.add_argument("--work", default="/tmp/bench_patch_dropout")
    a.add_argument("--train-images", type=int, default=6000)
    a.add_argument("--valid-images", type=int, default=600)
    args = a.parse_args()
    work = Path(args.work)
    build_data(work, args.train_images, args.valid_images)
    probe = {p: train(work, p, args.probe_steps, 1, f"probe_{p}") for p in args.ps}
    print("| P | samples/s (probe) | step time ms | vs P=0 |\n|---|---|---|---|")
    base = probe[args.ps[0]]["samples_s"]
    for p, r in probe.items():
        print(f"| {p} | {r['samples_s']:.0f} | {64e3 / r['samples_s']:.0f} | {r['samples_s'] / base:.2f}x |")
    print(f"\n| P | steps in ~{args.seconds:.0f} s | train wall s (incl. start-up, final validation) | "
          "valid mean recall | R@1 |\n|---|---|---|---|---|")
    for p in args.ps:
        steps = max(10, int(args.seconds * probe[p]["samples_s"] / 64))
        epochs = math.ceil(steps / probe[p]["steps_per_epoch"])  # the cosine ends about where we stop
        r = train(work, p, steps, epochs, f"equal_{p}")
        print(f"| {p} | {steps} | {r['wall_s']:.0f} | {r['mean_recall']} | {r['r1']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
