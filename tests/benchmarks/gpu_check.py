"""The GPU check: one script, ~8 minutes on one H100/H200-class GPU (`make gpu-check`).

Measures ViT-B-16 + RoBERTa-base at 224 px on synthetic batches through the trainer's own code
(Trainer._build_engine: DeepSpeed + our optimizer choice; ContrastiveStep + ClipLoss: the step the
training loop runs), data loading left out:
  * ZeRO-2 bf16, ZeRO-2 fp16 (DeepSpeed's dynamic loss scaler), ZeRO-3 bf16 at the largest micro batch
    that fits: samples/s, TFLOP/s per GPU, MFU against the device's peak (engine/train/flops.py), peak memory;
  * the same model in a plain torch.amp (bf16 autocast) + DDP + fused AdamW loop, the peer baseline;
    its batch search (doubling, then one bisection step, catching OOM) sets the batch for all rows;
  * fp16 overflow handling: an inf injected into a gradient -> the step is skipped, the loss scale
    halves, the next steps train again;
  * the optimizer step alone: our choice (apex/DeepSpeed FusedAdam) vs torch AdamW (foreach, fused);
  * exact top-10 (engine/retrieval/search.py) at 5k x 30k and 100k x 1M x 512 on the GPU, checked against a
    plain matmul + topk on a sample of queries;
  * image feature extraction (engine/extract.encode_images, bf16) in images/s, LMDB reads left out.
Prints a Markdown table and writes it as JSON (--out).

  python tests/benchmarks/gpu_check.py --out runs/gpu_check.json # on a GPU machine (make gpu-check)
  python tests/benchmarks/gpu_check.py --cpu-smoke --out x.json  # the same code paths, tiny, on CPU

Each training row runs in its own process (DeepSpeed engines of different ZeRO stages do not share a
process well, and an OOM leaves nothing behind).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_parts import device, part_extract, part_optimizer, part_topk, sync  # noqa: E402

_NEEDED = ("torch", "numpy", "deepspeed", "transformers", "tqdm", "tensorboardX", "lmdb")


def check_imports() -> None:
    """A bare GPU machine may have torch and nothing else: say what to install before any work."""
    missing = []
    for name in _NEEDED:
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or a broken build
            missing.append(f"{name} ({type(e).__name__}: {e})")
    if missing:
        print("gpu_check: missing packages: " + "; ".join(missing), file=sys.stderr)
        print(f"install them with:  pip install -r {REPO / 'requirements.txt'}\n(keep the machine's own "
              "torch: pip install $(grep -v '^torch' requirements.txt | grep -v '^#')  if it is newer)",
              file=sys.stderr)
        sys.exit(2)


SIZES = {  # what runs where
    "gpu": dict(vision="ViT-B-16", text="RoBERTa-wwm-ext-base-chinese", context=52, start_batch=64,
                max_batch=4096, warmup=3, steps=10, topk=[(5000, 30000), (100000, 1000000)],
                extract_images=8192, extract_batch=512),
    "cpu": dict(vision="ViT-tiny-test", text="BERT-tiny-test", context=16, start_batch=4, max_batch=8,
                warmup=1, steps=2, topk=[(200, 3000)], extract_images=64, extract_batch=16),
}
TRAIN_ROWS = [("ZeRO-2 bf16", "ds_configs/zero2_bf16.json"), ("ZeRO-2 fp16", "ds_configs/zero2_fp16.json"),
              ("ZeRO-3 bf16", "ds_configs/zero3_bf16.json")]
CPU_CONFIGS = {"ds_configs/zero2_bf16.json": "ds_configs/cpu_zero2_bf16.json",
               "ds_configs/zero3_bf16.json": "ds_configs/cpu_zero3_fp32.json"}


# ------------------------------------------------------------------------- shared pieces ----

def _batch(s, b, seed=0):
    """Synthetic (normalised pixels, token ids) on the device; every text runs the full context."""
    import torch

    from data.images.transform import normalize_uint8
    from models import load_text_config, load_vision_config

    res, vocab = load_vision_config(s["vision"]).image_resolution, load_text_config(s["text"]).vocab_size
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (b, 3, res, res), dtype=torch.uint8, generator=g)
    ids = torch.randint(5, vocab, (b, s["context"]), generator=g)
    ids[:, 0] = 101
    return normalize_uint8(img.to(device())), ids.to(device())


def _is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def _peak_gb():
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _rate(s, step, b):
    """Warm up, then time s['steps'] steps of batch b: samples/s."""
    import torch

    for i in range(s["warmup"]):
        step(i)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for i in range(s["steps"]):
        step(s["warmup"] + i)
    sync()
    return s["steps"] * b / (time.perf_counter() - t0)


def _figures(s, samples_s, precision):
    from engine.train import flops
    from models.config import load_text_config, load_vision_config

    f = flops.clip_sample_flops(load_vision_config(s["vision"]), load_text_config(s["text"]), s["context"])
    name = flops.describe_device()[1]
    tflops, mfu = flops.throughput(f.train, samples_s, flops.device_peak_tflops(name, precision))
    return {"samples_s": samples_s, "tflops": tflops, "mfu": mfu, "flops_per_sample": f.train,
            "peak_mem_gb": _peak_gb()}


# ------------------------------------------------------------------------- workers (processes) ----

def _trainer_engine(s, ds_path):
    """The trainer's engine for this DeepSpeed JSON: Trainer._build_engine on a config made by the
    real flag parser (the data files are placeholders; the trainer's data side is not used)."""
    from engine.train.config import build_config
    from engine.train.flags import parse_args
    from engine.train.trainer import Trainer
    from models import build_clip

    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    (tmp / "q.jsonl").write_text("")
    (tmp / "vocab.txt").write_text("[PAD]\n")
    args = parse_args(["--deepspeed_config", str(REPO / ds_path), "--train-data", str(tmp / "q.jsonl"),
                       "--train-img", str(tmp), "--vocab", str(tmp / "vocab.txt"), "--model", s["vision"],
                       "--text-model", s["text"], "--context-length", str(s["context"]), "--lr", "1e-5",
                       "--warmup", "10", "--logs", str(tmp), "--name", "run"])
    cfg = build_config(args, world_size=1)
    trainer = Trainer(cfg)
    engine = trainer._build_engine(build_clip(s["vision"], s["text"]), total_steps=1000)
    return cfg, trainer, engine


def work_train(s, ds_path, batch):
    """One DeepSpeed row: samples/s at `batch`; for fp16 also the overflow check."""
    import torch

    from engine import dist
    from engine.train.step import ContrastiveStep
    from models import ClipLoss

    dist.init_distributed(use_deepspeed=True, always=True)
    cfg, trainer, engine = _trainer_engine(s, ds_path)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.ds.precision]
    loss_fn = ClipLoss(gather=dist.all_gather_with_grad, rank=dist.rank(), local_loss=True)
    stepper = ContrastiveStep(engine, loss_fn, 1)
    data = _batch(s, batch)
    out = {"batch": batch, "optimizer": trainer.opt_name}
    try:
        out.update(_figures(s, _rate(s, lambda i: stepper.run([(data[0].to(dtype), data[1])]), batch), cfg.ds.precision))
    except Exception as e:
        if not _is_oom(e):
            raise
        return {"batch": batch, "oom": True}
    if cfg.ds.precision == "fp16":
        out["overflow"] = _overflow_check(engine, stepper, data)
    return out


def _overflow_check(engine, stepper, data):
    """Inject inf into one gradient until the loss scale drops (hysteresis may absorb the first):
    every injected step must be skipped, the scale must halve, and the next steps must train."""
    import math

    opt = engine.optimizer
    scale = lambda: float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", float("nan"))))  # noqa: E731
    for _ in range(20):  # let the scaler settle: natural overflows happen at 2^16 early on
        if stepper.run([data]) and engine.was_step_applied():
            break
    before, skipped, param = scale(), 0, next(p for p in engine.module.parameters() if p.requires_grad)
    hook = param.register_hook(lambda g: g * math.inf)
    try:
        for _ in range(4):
            stepper.run([data])
            skipped += not engine.was_step_applied()
            if scale() < before:
                break
    finally:
        hook.remove()
    after = scale()
    recovered = [stepper.run([data]) for _ in range(3)]
    ok = (skipped >= 1 and after == before / 2 and engine.was_step_applied()
          and all(math.isfinite(r.loss) for r in recovered))
    return {"scale_before": before, "scale_after": after, "skipped_steps": skipped,
            "loss_after": recovered[-1].loss, "ok": bool(ok)}


def work_baseline(s, batch_hint):
    """The peer: the same model in plain PyTorch (bf16 autocast, DDP, AdamW fused on GPU, ClipLoss).
    Finds the largest batch that fits (doubling, then one bisection step) unless batch_hint is given."""
    import torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from engine import dist
    from engine.train.optim import param_groups
    from models import ClipLoss, build_clip

    dist.init_distributed(use_deepspeed=False, always=True)
    dev = device()
    model = build_clip(s["vision"], s["text"]).to(dev)
    ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    groups = [{k: v for k, v in g.items() if k != "name"} for g in param_groups(model, 0.001)]
    opt = torch.optim.AdamW(groups, lr=1e-5, fused=dev.type == "cuda")
    loss_fn = ClipLoss(gather=dist.all_gather_with_grad, rank=dist.rank(), local_loss=True)

    def make_step(data, net):
        def step(_):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = net(*data)
            loss = loss_fn(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def fits(b):
        # on the bare model: DDP's reducer may be left mid-reduction by an OOM in backward
        try:
            make_step(_batch(s, b), model)(0)
            sync()
            return True
        except Exception as e:
            if not _is_oom(e):
                raise
        opt.zero_grad(set_to_none=True)  # outside the except: the traceback no longer pins tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return False

    batch, tried = batch_hint, []
    if not batch:
        ok, bad = None, None
        b = s["start_batch"]
        while b <= s["max_batch"]:
            tried.append(b)
            if not fits(b):
                bad = b
                break
            ok, b = b, b * 2
        if ok is None:
            raise RuntimeError(f"batch {s['start_batch']} does not fit")
        if bad:  # one bisection step between the last fit and the first OOM, in multiples of 8
            mid = (ok + bad) // 2 // 8 * 8
            tried.append(mid)
            if mid > ok and fits(mid):
                ok = mid
        batch = ok
    out = {"batch": batch, "tried": tried, "optimizer": "torch AdamW" + (" (fused)" if dev.type == "cuda" else "")}
    out.update(_figures(s, _rate(s, make_step(_batch(s, batch), ddp), batch), "bf16"))
    tdist.barrier()
    return out


# ------------------------------------------------------------------------- driver ----

def _run_worker(kind, mode, args, timeout):
    """Run one worker in a fresh single-rank process; its last stdout line is RESULT <json>."""
    from engine.dist import _free_port

    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--worker", kind, "--mode", mode, "--args", json.dumps(args)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        return {"error": f"exit {p.returncode}: " + (p.stderr or p.stdout)[-1500:]}
    res = json.loads(lines[-1][7:])
    res["process_s"] = time.perf_counter() - t0
    return res


def run_all(mode, timeout):
    s = SIZES[mode]
    report = {"device": None, "mode": mode, "model": f"{s['vision']} + {s['text']}", "context": s["context"],
              "train": {}, "notes": []}
    from engine.train import flops

    report["device"] = flops.describe_device()[0]
    print(f"gpu_check ({mode}): {report['model']} on {report['device']}", flush=True)
    base = _run_worker("baseline", mode, {}, timeout)
    report["train"]["torch.amp + DDP (peer)"] = base
    batch = base.get("batch")
    print(f"  peer baseline: {base}", flush=True)
    for name, path in TRAIN_ROWS:
        if mode == "cpu" and path not in CPU_CONFIGS:
            report["train"][name] = {"skipped": "DeepSpeed refuses fp16 on CPU (fp16 is the CUDA path)"}
            continue
        path = CPU_CONFIGS.get(path, path) if mode == "cpu" else path
        res = {"error": "the peer's batch search failed"} if not batch else _run_worker(
            "train", mode, {"ds": path, "batch": batch}, timeout)
        if res.get("oom"):  # ZeRO's buffers may need more than the plain loop: try half
            res = _run_worker("train", mode, {"ds": path, "batch": max(1, batch // 2)}, timeout)
        if "samples_s" in res and "samples_s" in base:
            res["vs_peer"] = res["samples_s"] / base["samples_s"]
        report["train"][name] = dict(res, config=path)
        print(f"  {name}: {res}", flush=True)
    for part, fn in (("optimizer_ms", part_optimizer), ("topk", part_topk), ("extract", part_extract)):
        t0 = time.perf_counter()
        try:
            report[part] = fn(s)
        except Exception as e:  # one broken part must not hide the others
            report[part] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  {part} ({time.perf_counter() - t0:.0f}s): {report[part]}", flush=True)
    return report


def table(report) -> str:
    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    rows = ["| run | micro batch | samples/s | TFLOP/s per GPU | MFU | peak memory GiB | vs peer | note |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in report["train"].items():
        note = r.get("skipped") or r.get("error", "")[:80] or f"{r.get('optimizer', '')}, {r.get('config', 'plain loop')}"
        if "overflow" in r:
            o = r["overflow"]
            note += (f"; injected inf: {o['skipped_steps']} step(s) skipped, scale {o['scale_before']:g} -> "
                     f"{o['scale_after']:g}, {'recovered' if o['ok'] else 'NOT OK'}")
        rows.append(f"| {name} | {r.get('batch', '-')} | {f(r.get('samples_s'), '.1f')} | "
                    f"{f(r.get('tflops'), '.1f')} | {f(r.get('mfu') and 100 * r['mfu'], '.1f')}"
                    f"{'%' if r.get('mfu') else ''} | {f(r.get('peak_mem_gb'), '.1f')} | "
                    f"{f(r.get('vs_peer'), '.2f')} | {note} |")
    opt = report.get("optimizer_ms", {})
    rows.append("")
    rows.append("optimizer step (ms): " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k}: {v}"
                                                     for k, v in opt.items()))
    for t in report.get("topk", []) if isinstance(report.get("topk"), list) else [report.get("topk")]:
        if t and "seconds" in t:
            rows.append(f"top-10 {t['queries']} x {t['images']} x 512: {t['seconds']:.2f} s, "
                        f"{t['gflops']:.0f} GFLOP/s, exact on a sample: {t['exact_on_sample']}")
        else:
            rows.append(f"top-10: {t}")
    e = report.get("extract", {})
    rows.append(f"extraction: {f(e.get('images_s'), '.0f')} images/s ({e.get('dtype', e.get('error'))})")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: the same code paths")
    p.add_argument("--out", default="runs/gpu_check.json", help="JSON report")
    p.add_argument("--timeout", type=int, default=300, help="seconds per training process")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="gpu", help=argparse.SUPPRESS)
    p.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    check_imports()
    if a.worker:
        s, w = SIZES[a.mode], json.loads(a.args)
        res = work_baseline(s, w.get("batch")) if a.worker == "baseline" else work_train(s, w["ds"], w["batch"])
        print("RESULT " + json.dumps(res), flush=True)
        from engine import dist

        dist.exit_process(0)
    import torch

    mode = "cpu" if a.cpu_smoke else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu-smoke for the CPU version", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    report = run_all(mode, a.timeout)
    report["seconds"] = time.perf_counter() - t0
    text = table(report)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_check: {report['seconds']:.0f}s; JSON in {a.out}")
    bad = [n for n, r in report["train"].items() if "error" in r]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
