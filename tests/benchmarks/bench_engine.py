"""Benchmark of the training engine (CPU).

1. Overhead: steps/s of the engine's step (DeepSpeed ZeRO-0 fp32 + engine.train.step.ContrastiveStep,
   exactly what the trainer runs) against a plain PyTorch loop (model, ClipLoss, AdamW with the same
   parameter groups, grad clipping, LambdaLR) on the same model and the same in-memory batches, one
   process, and against the peer baseline: open_clip's CLIP at our towers' sizes with its ClipLoss in
   the same plain loop (when open_clip is installed). The loops take turns step by step. Data loading
   is left out: it is the same code either way.
2. Memory: for ZeRO stages 0/1/2/3 on 2 gloo ranks, per rank: the bytes of the Adam state
   (exp_avg, exp_avg_sq) and of the fp32 master partition the optimizer holds, and the process's
   peak RSS after a few steps.

  python tests/benchmarks/bench_engine.py                      # both parts, prints a Markdown table
  python tests/benchmarks/bench_engine.py --part overhead --steps 40
  python tests/benchmarks/bench_engine.py --part memory --vision ViT-B-16 --text RBT3-chinese

Set OMP_NUM_THREADS for the overhead part to the cores you want to use (README "Speed" gives the
figures at 1 and 2 threads).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _batches(vision: str, text: str, batch: int, n: int, seed: int = 0):
    """n random (uint8 image batch, token batch) pairs at the model's resolution."""
    import torch

    from models import load_text_config, load_vision_config

    res = load_vision_config(vision).image_resolution
    vocab = load_text_config(text).vocab_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, generator=g)
        ids = torch.randint(5, vocab, (batch, 32), generator=g)
        ids[:, 0] = 101
        ids[:, -4:] = 0
        out.append((img, ids))
    return out


def _prep(batch):
    from data.images.transform import normalize_uint8

    return normalize_uint8(batch[0]), batch[1]


def _device_batch(batch):
    """The trainer's form of a micro-batch: uint8 images normalised when the step asks."""
    import torch

    from data.images.transform import IMAGE_MEAN, IMAGE_STD
    from engine.loader.batches import DeviceBatch

    return DeviceBatch(batch[0], batch[1], IMAGE_MEAN, IMAGE_STD, torch.float32)


def _optimizer(model):
    """Our optimizer (AdamW, our parameter groups) and warm-up + cosine schedule, the same in every loop."""
    from engine.train.optim import build_optimizer, param_groups, scheduler_factory

    opt, _ = build_optimizer(param_groups(model, 0.001), 1e-4, on_gpu=False, offload=False)
    return opt, scheduler_factory(10, 1000)


def _plain_step(model, loss_fn, features):
    """One step of a plain PyTorch loop: forward, loss, backward, grad clipping, AdamW, schedule.
    features(model output) -> (image features, text features, exp(logit scale)); the plain loop of our
    model and the open_clip peer differ only in it and in the loss."""
    import torch

    opt, schedule = _optimizer(model)
    sched = schedule(opt)

    def step(b):
        x, t = _prep(b)
        loss = loss_fn(*features(model(x, t)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return step


def time_interleaved(steppers: dict, batches, warmup: int, repeats: int) -> dict:
    """Seconds per step of each stepper, taking turns step by step on the same batches (the order
    rotates every step), so that load from other jobs on a shared machine hits every loop alike."""
    names = list(steppers)
    for b in batches[:warmup]:
        for n in names:
            steppers[n](b)
    times = {n: [] for n in names}
    i = 0
    for _ in range(repeats):
        for b in batches[warmup:]:
            for n in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter()
                steppers[n](b)
                times[n].append(time.perf_counter() - t0)
            i += 1
    return times


def overhead(vision: str, text: str, batch: int, steps: int, warmup: int, repeats: int) -> dict:
    import statistics

    import torch

    from engine import dist
    from engine.train.step import ContrastiveStep
    from models import ClipLoss, build_clip

    dist.init_distributed(use_deepspeed=True, always=True)
    import deepspeed

    batches = _batches(vision, text, batch, steps + warmup)
    torch.manual_seed(0)
    init = build_clip(vision, text).state_dict()

    def ours():
        model = build_clip(vision, text)
        model.load_state_dict(init)
        return model

    def engine_step():
        model = ours()
        opt, schedule = _optimizer(model)
        cfg = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
               "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, lr_scheduler=schedule,
                                          dist_init_required=False)
        stepper = ContrastiveStep(engine, ClipLoss(gather=dist.all_gather_with_grad), 1)
        return lambda b: stepper.run([_device_batch(b)])

    steppers = {"plain": _plain_step(ours(), ClipLoss(),
                                     lambda o: (o["image_features"], o["text_features"], o["logit_scale"])),
                "engine": engine_step()}
    peer = _open_clip_model(vision, text, batches[0][1].shape[1])
    if peer is not None:
        from open_clip.loss import ClipLoss as OpenClipLoss

        steppers["open_clip"] = _plain_step(peer, OpenClipLoss(), lambda o: o)
    times = time_interleaved(steppers, batches, warmup, repeats)
    rate = {n: 1 / statistics.median(t) for n, t in times.items()}  # steps/s from the median step
    total = {n: len(t) / sum(t) for n, t in times.items()}          # steps/s over all timed steps
    p, e, oc = rate["plain"], rate["engine"], rate.get("open_clip")
    return {"model": f"{vision} + {text}", "batch": batch, "threads": torch.get_num_threads(),
            "timed_steps": len(times["engine"]), "plain_steps_s": p, "engine_steps_s": e,
            "overhead_pct": 100 * (p / e - 1), "open_clip_steps_s": oc,
            "engine_vs_open_clip": e / oc if oc else None, "mean_rate": total,
            "load_average": os.getloadavg(), "step_seconds": times}


def _open_clip_model(vision: str, text: str, context: int):
    """The peer baseline's model: open_clip's CLIP (ViT + its causal text transformer) at our towers'
    widths, depths, heads and MLP sizes; None without open_clip (pip install -r
    tests/benchmarks/requirements.txt). Its forward returns (image features, text features,
    exp(logit scale)), as ours returns them in a dict."""
    try:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    except ImportError:
        print("open_clip not installed: no peer baseline (pip install -r tests/benchmarks/requirements.txt)")
        return None
    import torch

    from models import load_text_config, load_vision_config

    vc, tc = load_vision_config(vision), load_text_config(text)
    torch.manual_seed(0)
    return CLIP(embed_dim=vc.embed_dim, quick_gelu=vc.act == "quick_gelu",
                vision_cfg=CLIPVisionCfg(layers=vc.vision_layers, width=vc.vision_width,
                                         head_width=vc.vision_width // vc.vision_heads,
                                         patch_size=vc.vision_patch_size, image_size=vc.image_resolution),
                text_cfg=CLIPTextCfg(context_length=context, vocab_size=tc.vocab_size, width=tc.hidden_size,
                                     heads=tc.num_attention_heads, layers=tc.num_hidden_layers,
                                     mlp_ratio=tc.intermediate_size / tc.hidden_size))


def _memory_rank(stage: int, vision: str, text: str, batch: int, steps: int, out: str) -> None:
    """One rank of the memory measurement (run by run_ranks)."""
    import torch

    from engine import dist
    from engine.train.step import ContrastiveStep
    from engine.train.optim import build_optimizer, param_groups
    from models import ClipLoss, build_clip

    dist.init_distributed(use_deepspeed=True, always=True)
    import deepspeed

    torch.manual_seed(0)
    model = build_clip(vision, text)
    n_params = sum(p.numel() for p in model.parameters())
    base_rss_mb = _rss_mb()  # libraries + the model's weights, before DeepSpeed
    opt, _ = build_optimizer(param_groups(model, 0.001), 1e-4, on_gpu=False, offload=False)
    # The shipped CPU config's ZeRO settings (bucket sizes matter for the flat buffers)
    shipped = "cpu_zero3_fp32.json" if stage == 3 else "cpu_zero2_fp32.json"
    zero = json.loads((REPO / "ds_configs" / shipped).read_text())["zero_optimization"] if stage else {}
    zero = dict(zero, stage=stage)
    cfg = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "zero_optimization": zero, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    stepper = ContrastiveStep(engine, ClipLoss(gather=dist.all_gather_with_grad, rank=dist.rank()), 1)
    for b in _batches(vision, text, batch, steps, seed=dist.rank()):
        stepper.run([_device_batch(b)])
    inner = engine.optimizer
    while hasattr(inner, "optimizer"):  # ZeRO wrappers hold the torch optimizer inside
        inner = inner.optimizer
    seen, adam, master = set(), 0, 0
    for state in inner.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.numel() > 1 and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                adam += v.numel() * v.element_size()
    module_ptrs = {p.data_ptr() for p in engine.module.parameters()}
    for g in inner.param_groups:
        for p in g["params"]:
            if p.data_ptr() not in module_ptrs:  # a separate fp32 partition, not the module's weights
                master += p.numel() * p.element_size()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, f"rank{dist.rank()}.json").write_text(json.dumps(
        {"stage": stage, "params": n_params, "adam_bytes": adam, "master_bytes": master, "peak_rss_mb": rss_mb,
         "base_rss_mb": base_rss_mb}))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def memory(vision: str, text: str, batch: int, steps: int) -> list:
    from tests.ranks import assert_all_ok, run_ranks

    rows = []
    for stage in (0, 1, 2, 3):
        with tempfile.TemporaryDirectory() as out:
            res = run_ranks([__file__, "--part", "_memory_rank", "--stage", str(stage), "--vision", vision,
                             "--text", text, "--batch", str(batch), "--steps", str(steps), "--out", out],
                            world_size=2, timeout=1200)
            assert_all_ok(res)
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
        rows.append({"stage": stage, "params": ranks[0]["params"],
                     "adam_mb": [r["adam_bytes"] / 2 ** 20 for r in ranks],
                     "master_mb": [r["master_bytes"] / 2 ** 20 for r in ranks],
                     "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
                     "added_rss_mb": [r["peak_rss_mb"] - r["base_rss_mb"] for r in ranks]})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "overhead", "memory", "_memory_rank"), default="all")
    p.add_argument("--vision", default=None)
    p.add_argument("--text", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    if a.part == "_memory_rank":
        _memory_rank(a.stage, a.vision, a.text, a.batch, a.steps, a.out)
        return 0
    results = {}
    if a.part in ("all", "overhead"):
        r = overhead(a.vision or "ViT-demo-64", a.text or "BERT-demo", a.batch or 64, a.steps or 30, a.warmup,
                     a.repeats)
        results["overhead"] = r
        oc, ratio = r["open_clip_steps_s"], r["engine_vs_open_clip"]
        print(f"\n| model | batch | threads | plain torch steps/s | engine steps/s | engine overhead | "
              f"open_clip plain loop steps/s | engine / open_clip |\n|---|---|---|---|---|---|---|---|\n"
              f"| {r['model']} | {r['batch']} | {r['threads']} | {r['plain_steps_s']:.2f} | "
              f"{r['engine_steps_s']:.2f} | {r['overhead_pct']:+.1f}% | {f'{oc:.2f}' if oc else 'n/a'} | "
              f"{f'{ratio:.3f}' if oc else 'n/a'} |")
        m = r["mean_rate"]
        print(f"{r['timed_steps']} timed steps per loop, interleaved step by step; steps/s from the median "
              f"step (from the mean: " + ", ".join(f"{n} {v:.2f}" for n, v in m.items()) +
              f"); load average {' '.join(f'{v:.2f}' for v in r['load_average'])} at the end")
    if a.part in ("all", "memory"):
        rows = memory(a.vision or "ViT-B-16", a.text or "RBT3-chinese", a.batch or 2, a.steps or 2)
        results["memory"] = rows
        print(f"\n{rows[0]['params'] / 1e6:.1f}M parameters, 2 ranks, fp32:\n\n"
              "| ZeRO stage | Adam state per rank (MB) | fp32 master partition per rank (MB) | "
              "peak RSS per rank (MB) | peak RSS above model+libs (MB) |\n|---|---|---|---|---|")
        for r in rows:
            cells = [" / ".join(f"{v:.0f}" for v in r[k]) for k in ("adam_mb", "master_mb", "peak_rss_mb",
                                                                      "added_rss_mb")]
            print(f"| {r['stage']} | " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
