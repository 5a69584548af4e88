"""torch.compile on the CPU at the model level: the demo CLIP in a plain loop, eager vs compiled.

  OMP_NUM_THREADS=1 python tests/benchmarks/bench_compile.py [--repeats 2 --steps 20]

Same random batches (64 images at 64 px, 16 tokens), AdamW, ClipLoss; eager and compiled alternate
in one process, each after a few warm-up steps (the compiled warm-up includes the compilation).
The trainer's `--compile` calls DeepSpeed's engine.compile(), which compiles the same module.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import models  # noqa: E402
from models import ClipLoss  # noqa: E402


def run(model, steps: int, warmup: int):
    """(warm-up seconds, samples/s after it)."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = ClipLoss()
    data = [(torch.randn(64, 3, 64, 64), torch.randint(5, 36, (64, 16))) for _ in range(4)]

    def step(i):
        out = model(*data[i % 4])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    t = time.perf_counter()
    for i in range(warmup):
        step(i)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    return warm, 64 * steps / (time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    for _ in range(a.repeats):
        for name, wrap in (("eager", lambda m: m), ("compiled", torch.compile)):
            torch.manual_seed(0)
            m = wrap(models.build_clip("ViT-demo-64", "BERT-demo", vocab_size=36))
            warm, rate = run(m, a.steps, 3)
            print(f"{name:9s} warm-up {warm:.1f} s, {rate:.1f} samples/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
