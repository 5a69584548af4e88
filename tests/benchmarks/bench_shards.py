"""Building a data set from webdataset / img2dataset shards against building the same pairs from a
MUGE tsv + jsonl, at 1M and 10M pairs. A script that prints a table, not a test:

  python tests/benchmarks/bench_shards.py [--sizes 1M,10M] [--per-job 100000] [--dir /tmp/x]
  python tests/benchmarks/bench_shards.py --sizes 20K,40K --per-job 10000 --per-tar 1000   # a smoke run

Data: 8 px JPEGs (tiny on purpose: it is the reading, not the decoding, that differs between the
paths; decoding is the same code in both), 10 captions per image (a .json list in the shards, ten
jsonl lines in MUGE form), 10,000 samples per tar as img2dataset writes them (webdataset's TarWriter).
Per size N:
  job      one job of a distributed build (`--num-shards K --shard-index 0`, K = N / --per-job, so every
           job builds about --per-job pairs), --workers 1 (one core), for both paths: wall time and
           pairs/s. A shard job reads only its own input tars; a tsv job reads the whole jsonl and scans
           the whole tsv for its images. (At 10M the tars no job 0 reads are hard links of the 1M ones:
           only the names matter to it.)
  whole    at the smallest size only: one process builds every shard (--workers 1), both paths, as
           many output shards as there are input tars
  start-up a fresh process opens the result and reads its first micro-batch of 64 (global shuffle),
           time and RSS growth above `import torch` (the other K-1 output shards are copies of job
           0's, arrays hard-linked, so the manifest counts N pairs)
  reader   samples/s reading one 10,000-sample tar: data/images/shards.py (its own tar reader), the
           standard library's tarfile in stream mode, and webdataset's own tar iterator
Everything is deleted at the end unless --keep.
"""
import argparse
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

CAPTIONS, RES = 10, 8
PER_TAR = 10_000  # img2dataset's default samples per tar; --per-tar changes it (the smoke test's small run)


def parse_size(text):
    text = text.strip().upper()
    return int(float(text.rstrip("KM")) * {"K": 10 ** 3, "M": 10 ** 6}.get(text[-1], 1))


def jpegs(n=16):
    from PIL import Image

    out = []
    for k in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def texts_and_vocab(root, n_texts=50_000):
    from data.synthetic import vocab_tokens

    tokens = vocab_tokens()
    (root / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    chars = [t for t in tokens if not t.startswith("[")]
    rng = np.random.default_rng(0)
    return ["".join(rng.choice(chars, size=int(rng.integers(4, 12)))) for _ in range(n_texts)]


def caption(texts, i, j):
    return texts[(i * CAPTIONS + j * 7919) % len(texts)]


def write_tars(folder, n_images, texts, pics, real_tars):
    """n_images samples in tars of PER_TAR; tars >= real_tars are hard links of tar (j % real_tars)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    for j in range((n_images + PER_TAR - 1) // PER_TAR):
        path = folder / f"{j:05d}.tar"
        if j >= real_tars:
            os.link(folder / f"{j % real_tars:05d}.tar", path)
            continue
        with open(path, "wb") as f:
            w = wds.TarWriter(f)
            for i in range(j * PER_TAR, min(n_images, (j + 1) * PER_TAR)):
                w.write({"__key__": f"{i:09d}", "jpg": pics[i % len(pics)],
                         "json": json.dumps({"key": f"{i:09d}", "captions": [caption(texts, i, c) for c in range(CAPTIONS)],
                                             "status": "success"}, ensure_ascii=False)})
            w.close()


def write_muge(root, n_images, texts, pics):
    """The same pairs as MUGE files: the images as a tsv, one jsonl line per (caption, image)."""
    b64 = [base64.urlsafe_b64encode(p) for p in pics]
    with open(root / "imgs.tsv", "wb") as f:
        for start in range(0, n_images, 100_000):
            f.write(b"".join(b"%d\t%s\n" % (i, b64[i % len(b64)]) for i in range(start, min(n_images, start + 100_000))))
    with open(root / "queries.jsonl", "w", encoding="utf-8") as f:
        for start in range(0, n_images, 10_000):
            f.write("".join(f'{{"query_id": {i * CAPTIONS + c}, "query_text": "{caption(texts, i, c)}", "item_ids": [{i}]}}\n'
                            for i in range(start, min(n_images, start + 10_000)) for c in range(CAPTIONS)))


def build(args, out, root):
    cmd = [sys.executable, str(REPO / "launch" / "build_dataset.py"), *map(str, args), "--output", str(out), "--vocab",
           str(root / "vocab.txt"), "--resolution", str(RES), "--context-length", "16", "--workers", "1", "--no-progress"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    took = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return took


def shard_pairs(out):
    return sum(json.loads(p.read_text())["pairs"] for p in (Path(out) / "shards").glob("*/shard.json"))


STARTUP = r"""
import json, resource, sys, time
import torch
from data.built.reader import BuiltDataset
from data.sampler import ShardedSampler
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
base = rss(); t0 = time.perf_counter()
ds = BuiltDataset(sys.argv[1])
s = ShardedSampler(len(ds), 0, 2, seed=0)
batch = ds.__getitems__(s.indices(0, 64).tolist())
print(json.dumps({"s": time.perf_counter() - t0, "mb": rss() - base, "pairs": len(ds)}))
"""


def startup(out, k, finalize_args, root):
    """Fill shards 1..k-1 with hard-linked copies of shard 0, finalize, time a fresh process's first batch."""
    shards = Path(out) / "shards"
    for i in range(1, k):
        if not (shards / f"{i:05d}").exists():
            # arrays hard-linked; the LMDB copied (py-lmdb opens one environment per file and process)
            shutil.copytree(shards / "00000", shards / f"{i:05d}",
                            copy_function=lambda a, b: shutil.copy(a, b) if a.endswith(".mdb") else os.link(a, b))
    build(finalize_args + ["--num-shards", k, "--finalize"], out, root)
    p = subprocess.run([sys.executable, "-c", STARTUP, str(out)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    if p.returncode:
        sys.exit(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def reader_rates(tar, repeats=3):
    import tarfile

    from webdataset import tariterators

    from data.images.shards import iter_samples

    def ours():
        return sum(1 for _ in iter_samples(str(tar), "json:captions"))

    def stream():
        n = 0
        with open(tar, "rb") as f, tarfile.open(fileobj=f, mode="r|") as t:
            for m in t:
                t.members = []
                if m.isreg():
                    t.extractfile(m).read()
                    n += m.name.endswith(".jpg")
        return n

    def webdataset():
        with open(tar, "rb") as f:
            return sum(1 for _ in tariterators.group_by_keys(tariterators.tar_file_expander([{"url": str(tar), "stream": f}])))

    times = {fn.__name__: [] for fn in (ours, stream, webdataset)}
    for _ in range(repeats):  # interleaved: the machine's load hits all three alike
        for fn in (ours, stream, webdataset):
            t0 = time.perf_counter()
            n = fn()
            times[fn.__name__].append(time.perf_counter() - t0)
    return {name: n / float(np.median(t)) for name, t in times.items()}


def main():
    global PER_TAR
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1M,10M", help="pairs, e.g. 1M,10M")
    p.add_argument("--per-job", type=int, default=100_000, help="pairs each distributed job builds")
    p.add_argument("--per-tar", type=int, default=10_000, help="samples per input tar")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    PER_TAR = a.per_tar
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    root = Path(a.dir or tempfile.mkdtemp(prefix="bench_shards_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()}")
    texts, pics = texts_and_vocab(root), jpegs()
    real_tars = (sizes[0] // CAPTIONS + PER_TAR - 1) // PER_TAR
    rows = []
    try:
        for n in sizes:
            d = root / f"n{n}"
            d.mkdir(exist_ok=True)
            t0 = time.perf_counter()
            write_tars(d / "tars", n // CAPTIONS, texts, pics, real_tars)
            write_muge(d, n // CAPTIONS, texts, pics)
            print(f"{n:,} pairs: inputs written in {time.perf_counter() - t0:.0f}s", flush=True)
            k = max(1, n // a.per_job)
            spec = str(d / "tars" / f"{{00000..{(n // CAPTIONS + PER_TAR - 1) // PER_TAR - 1:05d}}}.tar")
            shard_args = ["--images", spec, "--caption-from", "json:captions"]
            muge_args = ["--queries", d / "queries.jsonl", "--images", d / "imgs.tsv"]
            row = {"pairs": n, "jobs": k}
            for name, args in (("shards", shard_args), ("tsv", muge_args)):  # side by side, same load
                took = build(args + ["--num-shards", k, "--shard-index", 0], d / f"job_{name}", root)
                pairs = shard_pairs(d / f"job_{name}")
                row[f"job_{name}"], row[f"job_pairs_{name}"] = (took, pairs / took), pairs
                row[f"start_{name}"] = startup(d / f"job_{name}", k, args, root)
            if n == sizes[0]:  # the same number of output shards for both: one per input tar
                tars = (n // CAPTIONS + PER_TAR - 1) // PER_TAR
                for name, args in (("shards", shard_args), ("tsv", muge_args)):
                    took = build(args + ["--num-shards", tars], d / f"whole_{name}", root)
                    row[f"whole_{name}"] = (took, shard_pairs(d / f"whole_{name}") / took)
            rows.append(row)
            print(json.dumps(row), flush=True)
        rates = reader_rates(root / f"n{sizes[0]}" / "tars" / "00000.tar")  # PER_TAR samples
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nload average at end: {os.getloadavg()}")
    print("\n| pairs | jobs K | shard job: s, pairs/s (1 core) | tsv job: s, pairs/s (1 core) | shards/tsv per core |"
          " start-up shards: s, MB | start-up tsv: s, MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        (ts, rs), (tt, rt) = r["job_shards"], r["job_tsv"]
        ss, st = r["start_shards"], r["start_tsv"]
        print(f"| {r['pairs']:,} | {r['jobs']} | {ts:.1f}, {rs:,.0f} | {tt:.1f}, {rt:,.0f} | {rs / rt:.2f} | "
              f"{ss['s']:.2f}, {ss['mb']:.0f} | {st['s']:.2f}, {st['mb']:.0f} |")
    r = rows[0]
    (ts, rs), (tt, rt) = r["whole_shards"], r["whole_tsv"]
    print(f"\nwhole build of {r['pairs']:,} pairs in one process (1 core): shards {ts:.1f}s ({rs:,.0f} pairs/s), "
          f"tsv {tt:.1f}s ({rt:,.0f} pairs/s): shards/tsv per core {rs / rt:.2f}")
    print(f"reader, samples/s on one {PER_TAR:,}-sample tar: " + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items()))


if __name__ == "__main__":
    main()
