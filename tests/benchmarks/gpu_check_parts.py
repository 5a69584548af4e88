"""The GPU check's in-process parts (tests/benchmarks/gpu_check.py): the optimizer step alone, exact
top-k on the device, image feature extraction; and the device helpers both files use."""
from __future__ import annotations

import time


def device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def part_optimizer(s):
    """Time of one optimizer step over the model's parameters (fp32, random gradients)."""
    import torch

    from engine.train.optim import build_optimizer, param_groups
    from models import build_clip

    dev = device()
    model = build_clip(s["vision"], s["text"]).to(dev)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    groups = param_groups(model, 0.001)
    plain = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    candidates = {"torch AdamW (foreach)": lambda: torch.optim.AdamW(plain, lr=1e-5, foreach=True)}
    if dev.type == "cuda":
        candidates["ours: " + build_optimizer(groups, 1e-5, True, False)[1]] = \
            lambda: build_optimizer(groups, 1e-5, True, False)[0]
        candidates["torch AdamW (fused)"] = lambda: torch.optim.AdamW(plain, lr=1e-5, fused=True)
    out = {}
    for name, make in candidates.items():
        opt = make()
        for _ in range(2):
            opt.step()
        sync()
        t0 = time.perf_counter()
        n = 5 if dev.type == "cpu" else 20
        for _ in range(n):
            opt.step()
        sync()
        out[name] = (time.perf_counter() - t0) / n * 1e3
        del opt
    if dev.type != "cuda":
        out["skipped"] = "fused optimizers are CUDA kernels (DeepSpeed's CPU FusedAdam is a 46 s JIT build)"
    return out


def part_topk(s):
    """engine.retrieval.search at each size on this device, checked against matmul + topk on 256 queries."""
    import numpy as np
    import torch

    from engine.inference.feature_files import ArraySource
    from engine.retrieval.search import plan_blocks, search

    dev, rng, out = device(), np.random.default_rng(0), []
    for n_q, n_img in s["topk"]:
        q = rng.standard_normal((n_q, 512), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        x = rng.standard_normal((n_img, 512), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        images = ArraySource(np.arange(n_img, dtype=np.int64), x)
        plan = plan_blocks(n_q, n_img, 512, 10, max_memory_mb=16384 if dev.type == "cuda" else 1024)
        search(q[:8], images, 10, plan, device=dev)  # warm-up (CUDA context, kernels)
        t0 = time.perf_counter()
        vals, rows = search(q, images, 10, plan, device=dev)
        wall = time.perf_counter() - t0
        sample = q[: min(256, n_q)]
        ref = torch.from_numpy(sample) @ torch.from_numpy(x).T  # CPU fp32 oracle
        exact = torch.equal(rows[: len(sample)], ref.topk(10, dim=1).indices) or \
            bool(torch.allclose(vals[: len(sample)], ref.topk(10, dim=1).values, atol=1e-5))
        out.append({"queries": n_q, "images": n_img, "seconds": wall,
                    "gflops": 2 * n_q * n_img * 512 / wall / 1e9, "exact_on_sample": exact})
        del x, images
    return out


class _SyntheticStore:
    """The two things encode_images needs from an ImageStore: get_many and the normalisation."""

    def __init__(self, n, res):
        import numpy as np

        from data.images.transform import IMAGE_MEAN, IMAGE_STD

        self.pixels = np.random.default_rng(0).integers(0, 256, (n, 3, res, res), dtype=np.uint8)
        self.mean, self.std = IMAGE_MEAN, IMAGE_STD

    def get_many(self, ids):
        return self.pixels[ids[0]: ids[-1] + 1]


def part_extract(s):
    import torch

    from engine.inference.extract import encode_images, eval_mode
    from models import build_clip

    dev = device()
    model = build_clip(s["vision"], s["text"]).to(dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model.to(dtype)
    store = _SyntheticStore(s["extract_images"], model.image_resolution)
    with eval_mode(model):
        encode_images(model, store, range(s["extract_batch"]), s["extract_batch"], dev, dtype)
        sync()
        t0 = time.perf_counter()
        _, feats = encode_images(model, store, range(s["extract_images"]), s["extract_batch"], dev, dtype)
        sync()
    return {"images_s": s["extract_images"] / (time.perf_counter() - t0), "dtype": str(dtype),
            "features": list(feats.shape)}


