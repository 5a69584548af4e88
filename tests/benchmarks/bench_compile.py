"""torch.compile on the CPU at the model level: the demo CLIP in a plain loop, eager vs compiled.

  OMP_NUM_THREADS=1 python tests/benchmarks/bench_compile.py [--steps 20 --repeats 2] [--warm-cache]

Same random batches (64 images at 64 px, 16 tokens), AdamW, ClipLoss, eager and compiled models from
the same weights in one process. First the compile: the compiled model's first steps (forward and
backward graphs are built by inductor there; gcc compiles the C++ kernels), timed beside the eager
model's first steps. By default inductor gets an empty cache directory, so this is the cost of a
first run; --warm-cache keeps the usual cache (/tmp/torchinductor_$USER), the cost of a re-run. Then
the steady state: both models take turns step by step on the same batches (see bench_engine.py),
samples/s from the median step. The trainer's `--compile` calls DeepSpeed's engine.compile(), which
compiles the same module with the same backend.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def make_step(model, batch: int):
    """One plain training step of `model` (AdamW, ClipLoss) on batch i of a fixed set of 4."""
    import torch

    from models import ClipLoss

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 3, 64, 64, generator=g), torch.randint(5, 36, (batch, 16), generator=g))
            for _ in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = ClipLoss()

    def step(i):
        out = model(*data[i % 4])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per model and repeat")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="first steps, the compilation among them")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's usual cache directory")
    a = p.parse_args()
    cache = None
    if not a.warm_cache:  # before torch is imported: inductor reads it from the environment
        cache = tempfile.TemporaryDirectory(prefix="inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    import torch

    import models
    from tests.benchmarks.bench_engine import time_interleaved

    torch.manual_seed(0)
    eager = models.build_clip("ViT-demo-64", "BERT-demo", vocab_size=36)
    twin = models.build_clip("ViT-demo-64", "BERT-demo", vocab_size=36)
    twin.load_state_dict(eager.state_dict())
    steppers = {"eager": make_step(eager, a.batch), "compiled": make_step(torch.compile(twin), a.batch)}
    first = {}
    for name, step in steppers.items():
        first[name] = []
        for i in range(a.warmup):
            t = time.perf_counter()
            step(i)
            first[name].append(time.perf_counter() - t)
    times = time_interleaved(steppers, list(range(a.steps)), 0, a.repeats)  # a "batch" is its index here
    rate = {n: a.batch / sorted(t)[len(t) // 2] for n, t in times.items()}
    print(f"threads {torch.get_num_threads()}, batch {a.batch}, inductor cache "
          f"{'warm (usual directory)' if a.warm_cache else 'empty (first run)'}\n")
    print("| model | first steps (s) | samples/s, median of " f"{len(times['eager'])} interleaved steps |"
          "\n|---|---|---|")
    for n in steppers:
        print(f"| {n} | {', '.join(f'{s:.2f}' for s in first[n])} | {rate[n]:.1f} |")
    print(f"\ncompiled / eager: {rate['compiled'] / rate['eager']:.3f}; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
