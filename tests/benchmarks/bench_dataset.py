"""Start-up cost of training at 1M..100M pairs: built data sets (launch/build_dataset.py) vs the seed's
queries jsonl + single LMDB. A script that prints a table, not a test:

  python tests/benchmarks/bench_dataset.py [--sizes 1M,10M,100M] [--old-path-at 1M] [--jpeg-images 300]

Per size N (pairs; --per-query images per query, sharing --images distinct 32 px images and --texts texts):
  build      launch/build_dataset.py wall time and pairs/s (the jsonl is written first, not counted)
  first step launch of launch/train.py on 2 ranks (tiny model, built data set) -> "step 1/" in rank 0's
             log, and the peak RSS (VmHWM) of each rank until then, and of it the largest RssAnon seen
             (the rest is file pages mapped in: the memory-mapped arrays, i.e. shared page cache)
  sampler    the trainer's sampler (data.sampler.ShardedSampler, global shuffle, as engine.loader.batches builds
             it) alone in a fresh process, rank 0 of 2, up to its first index: time and RSS above
             `import torch` (the lazy Feistel shuffle: neither should grow with N)
  loader     samples/s of random micro-batches of 64 from the built data set, in process
The old path (--old-path-at) is the same train.py launch with --train-data JSONL --train-img LMDB.
--jpeg-images measures 224 px storage: bytes per image as uint8 and as JPEG q95 (photo-like images), and
decode throughput (data.images.jpeg, CPU threads) against uint8 LMDB reads. Everything is deleted at the end
(unless --keep).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

RES = 32  # ViT-tiny-test's resolution


def parse_size(text):
    text = text.strip().upper()
    mult = {"K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * mult)


def make_sources(root: Path, n_images: int, n_texts: int, seed=0):
    """A store of n_images random 32 px images (our LMDB format), the synthetic vocab, n_texts texts."""
    from data.images.store import ImageStoreWriter
    from data.synthetic import vocab_tokens

    rng = np.random.default_rng(seed)
    with ImageStoreWriter(root / "images", RES) as w:
        for start in range(0, n_images, 2000):
            ids = range(start, min(n_images, start + 2000))
            w.put_many((i, rng.integers(0, 256, (3, RES, RES), dtype=np.uint8)) for i in ids)
        w.finish()
    tokens = vocab_tokens()
    (root / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    chars = [t for t in tokens if not t.startswith("[")]
    texts = ["".join(rng.choice(chars, size=int(rng.integers(4, 12)))) for _ in range(n_texts)]
    return texts


def write_queries(path: Path, n_pairs: int, n_images: int, texts, per_query=10, seed=1):
    rng = np.random.default_rng(seed)
    n_q = n_pairs // per_query
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, n_q, 100_000):
            m = min(n_q, start + 100_000) - start
            items = rng.integers(0, n_images, (m, per_query))
            t = rng.integers(0, len(texts), m)
            f.write("".join(f'{{"query_id": {start + k}, "query_text": "{texts[t[k]]}", "item_ids": '
                            f'[{", ".join(map(str, items[k]))}]}}\n' for k in range(m)))


def rss_mb(pid, field="VmHWM"):
    """A memory figure of /proc/<pid>/status in MB: VmHWM (peak RSS), RssAnon (the process's own memory,
    now) or RssFile (file pages mapped in, e.g. the memory-mapped pair arrays: page cache, shared)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def env_for(rank, world, port):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
               WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def time_to_first_step(argv, timeout=900):
    """(seconds from launch to rank 0's 'step 1/' line, [peak RSS MB of each rank by then],
    [largest RssAnon MB of each rank seen by then])."""
    from tests.ranks import free_port

    port, t0 = free_port(), time.perf_counter()
    procs = [subprocess.Popen([sys.executable, *argv], env=env_for(r, 2, port), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    seen = {}
    out0 = []

    def watch(r):
        for line in procs[r].stdout:
            if r == 0:
                out0.append(line)
            if " step 1/" in line and r not in seen:
                seen[r] = time.perf_counter() - t0
    threads = [threading.Thread(target=watch, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    rss, anon = [0.0, 0.0], [0.0, 0.0]
    while 0 not in seen and time.perf_counter() - t0 < timeout and procs[0].poll() is None:
        for r, p in enumerate(procs):
            rss[r] = max(rss[r], rss_mb(p.pid) or 0)
            anon[r] = max(anon[r], rss_mb(p.pid, "RssAnon") or 0)
        time.sleep(0.05)
    for p in procs:
        p.wait(timeout=timeout)
    for t in threads:
        t.join(5)
    if 0 not in seen:
        raise RuntimeError("train.py did not reach step 1:\n" + "".join(out0[-30:]))
    return seen[0], rss, anon


def train_argv(root, train_flags, name):
    ds = root / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0,
                              "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}))
    return [str(REPO / "launch" / "train.py"), "--deepspeed_config", str(ds), *train_flags, "--vocab",
            str(root / "vocab.txt"), "--model", "ViT-tiny-test", "--text-model", "BERT-tiny-test", "--logs",
            str(root / "runs"), "--name", name, "--max-steps", "2", "--epochs", "1", "--log-every-steps", "1",
            "--save-frequency", "0"]


def sampler_alone(n):
    """Seconds to the first index and peak RSS (MB) above `import torch` of the trainer's sampler
    (engine.loader.batches.build_sampler's global shuffle) for rank 0 of 2, in a fresh process."""
    code = ("import time,sys; sys.path.insert(0, %r); import torch; from data.sampler import ShardedSampler;"
            "t=time.perf_counter(); it=iter(ShardedSampler(%d, 0, 2, seed=0)); next(it);"
            "print(time.perf_counter()-t); print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
            % (str(REPO), n))
    base = subprocess.run([sys.executable, "-c", "import torch; print(open('/proc/self/status').read()"
                           ".split('VmHWM:')[1].split()[0])"], capture_output=True, text=True, check=True)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    secs, kb = p.stdout.split()
    return float(secs), (int(kb) - int(base.stdout.split()[0])) / 1024


def loader_rate(path, batches=40, batch=64):
    from data.built.reader import BuiltDataset

    ds = BuiltDataset(path)
    rng = np.random.default_rng(0)
    idx = [rng.integers(0, len(ds), batch).tolist() for _ in range(batches + 2)]
    for b in idx[:2]:  # warm the shards' handles
        ds.__getitems__(b)
    t = time.perf_counter()
    for b in idx[2:]:
        ds.__getitems__(b)
    return batches * batch / (time.perf_counter() - t)


def bench_size(root, n, args, rows):
    q = root / f"q_{n}.jsonl"
    t = time.perf_counter()
    write_queries(q, n, args.images, args.texts_list, per_query=args.per_query)
    wrote = time.perf_counter() - t
    out = root / f"built_{n}"
    t = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "launch" / "build_dataset.py"), "--queries", str(q), "--images",
                    str(root / "images"), "--output", str(out), "--vocab", str(root / "vocab.txt"),
                    "--resolution", str(RES), "--num-shards", str(args.shards), "--workers", str(args.workers),
                    "--no-progress"], check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))
    build_s = time.perf_counter() - t
    first, rss, anon = ((float("nan"), [float("nan")] * 2, [float("nan")] * 2) if n in args.skip_train_at else
                        time_to_first_step(train_argv(root, ["--train-data", str(out)], f"built{n}")))
    s_secs, s_mb = sampler_alone(n)
    rate = loader_rate(out)
    first_row = len(rows)
    rows.append((f"{n / 1e6:g}M built", f"{build_s:.0f} s ({n / build_s / 1e3:.0f}k pairs/s, {args.per_query}/query)",
                 f"{first:.1f}", f"{rss[0]:.0f} / {rss[1]:.0f}", f"{anon[0]:.0f} / {anon[1]:.0f}",
                 f"{s_secs:.1f} s, {s_mb:.0f} MB", f"{rate:.0f}"))
    if n in args.old_at:
        first, rss, anon = time_to_first_step(train_argv(root, ["--train-data", str(q), "--train-img",
                                                                str(root / "images")], f"old{n}"))
        rows.append((f"{n / 1e6:g}M jsonl+LMDB", "-", f"{first:.1f}", f"{rss[0]:.0f} / {rss[1]:.0f}",
                     f"{anon[0]:.0f} / {anon[1]:.0f}", f"{s_secs:.1f} s, {s_mb:.0f} MB", "-"))
    if not args.keep:
        q.unlink()
        shutil.rmtree(out)
    for row in rows[first_row:]:
        print(" | ".join(row), flush=True)


def bench_jpeg(root, n_images):
    """Bytes per 224 px image (uint8 vs JPEG q95) and decode throughput vs uint8 LMDB reads."""
    from data.images.transform import load_and_preprocess
    from data.images.jpeg import decode_jpegs, encode_jpeg
    from data.images.store import ImageStore, ImageStoreWriter
    from tests.benchmarks.bench_data import photo_like_jpegs

    imgs = [load_and_preprocess(b, 224) for b in photo_like_jpegs(n_images, 500)]
    blobs = [encode_jpeg(a, 95) for a in imgs]
    with ImageStoreWriter(root / "s224", 224) as w:
        w.put_many(enumerate(imgs))
        w.finish()
    store = ImageStore(root / "s224")
    ids = list(range(n_images))
    reps = max(1, 3000 // n_images)
    t = time.perf_counter()
    for _ in range(reps):
        store.get_many(ids)
    u8 = reps * n_images / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(reps):
        decode_jpegs(blobs, (3, 224, 224))
    jp = reps * n_images / (time.perf_counter() - t)
    mean = float(np.mean([len(b) for b in blobs]))
    print(f"\n224 px, {n_images} photo-like images: uint8 {3 * 224 * 224} B/image, JPEG q95 {mean:.0f} B/image "
          f"({3 * 224 * 224 / mean:.1f}x smaller); per 1M images: uint8 {3 * 224 * 224 / 1e3:.1f} GB, "
          f"JPEG {mean / 1e3:.1f} GB")
    print(f"reads: uint8 LMDB {u8:.0f} img/s, JPEG decode (data.images.jpeg, {os.environ.get('CLIP_JPEG_THREADS') or min(8, os.cpu_count())} "
          f"threads) {jp:.0f} img/s on {os.cpu_count()} cores")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1M,10M", help="pairs per data set, e.g. 1M,10M,100M")
    p.add_argument("--old-path-at", default="1M", help="sizes at which to also time the jsonl+LMDB path")
    p.add_argument("--skip-train-at", default="", help="sizes at which not to launch train.py "
                   "(e.g. to time only the build)")
    p.add_argument("--images", type=int, default=20_000, help="distinct images (32 px)")
    p.add_argument("--texts", type=int, default=50_000, help="distinct texts")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-query", type=int, default=10, help="images per query (pairs per jsonl line); "
                   "the build's jsonl parsing costs per line, so 100 makes a 100M build 10x cheaper")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--jpeg-images", type=int, default=0, help="also measure 224 px JPEG vs uint8 (0: skip)")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, deleted after)")
    p.add_argument("--keep", action="store_true", help="keep the data sets and train.py's logs (to look into a "
                   "row afterwards); the folder is printed, delete it yourself")
    args = p.parse_args()
    args.old_at = {parse_size(x) for x in args.old_path_at.split(",") if x}
    args.skip_train_at = {parse_size(x) for x in args.skip_train_at.split(",") if x}
    root = Path(tempfile.mkdtemp(prefix="bench_dataset_", dir=args.dir))
    try:
        args.texts_list = make_sources(root, args.images, args.texts)
        rows = [("pairs", "build", "launch->step 1 (s)", "peak RSS rank0/1 (MB)", "of it anon (MB)",
                 "sampler alone (rank 0 of 2)",
                 "loader samples/s")]
        print(" | ".join(rows[0]), flush=True)
        for size in args.sizes.split(","):
            if size:
                bench_size(root, parse_size(size), args, rows)
        if args.jpeg_images:
            bench_jpeg(root, args.jpeg_images)
    finally:
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
