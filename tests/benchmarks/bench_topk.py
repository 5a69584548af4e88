"""Exact top-k benchmark: our blocked search vs faiss IndexFlatIP vs the machine's matmul limit.

  python tests/benchmarks/bench_topk.py                       # 5k x 30k and 20k x 100k, D=512, fp32
  python tests/benchmarks/bench_topk.py --large 100000 1000000 # + the streamed CLI run with its peak RSS,
                                                               #   then a faiss script on the same shards

The matmul limit is measured in the same run: the best GFLOP/s of a bare fp32 GEMM (numpy/OpenBLAS
and torch/MKL, at our block shape, 4096x4096 and 2048x16384, x D); time_limit = 2*Q*N*D / that.
Two fractions are printed: of numpy's limit (the BLAS our CPU search multiplies with, and the
issue's yardstick) and of the best of both libraries (MKL's GEMM is ~5 % faster here). faiss is optional
(pip install -r tests/benchmarks/requirements.txt); without it its columns say "n/a". Each timing is
the best of --repeats runs, interleaved so that load from other processes hits all alike.
"""
import argparse
import os
import sys

THREADS_DEFAULT = 2


def _threads_from_argv() -> int:
    # BLAS thread pools are sized when numpy/torch load: decide before importing them.
    if "--threads" in sys.argv:
        return int(sys.argv[sys.argv.index("--threads") + 1])
    return THREADS_DEFAULT


_T = str(_threads_from_argv())
os.environ["OMP_NUM_THREADS"] = _T
os.environ["OPENBLAS_NUM_THREADS"] = _T
os.environ["MKL_NUM_THREADS"] = _T
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.inference.feature_files import ArraySource, save_features, shard_name  # noqa: E402
from engine.retrieval.search import plan_blocks, search  # noqa: E402

try:
    import faiss  # noqa: E402
except ImportError:  # benchmark-only dependency
    faiss = None


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def settle() -> None:
    """Wait out the spinning of the BLAS/OpenMP worker threads that the previous measurement
    left (OpenBLAS's spin for ~0.1 s after a multi-threaded call), so that they do not take a
    core from the next one: each timing starts on a quiet machine, ours and faiss's alike."""
    time.sleep(0.5)


def gemm_gflops(m: int, n: int, d: int, repeats: int) -> dict:
    """Bare fp32 GEMM throughput at one block shape, numpy and torch."""
    rng = np.random.default_rng(0)
    a, b = unit_rows(rng, m, d), unit_rows(rng, n, d)
    out = np.empty((m, n), np.float32)
    ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
    flops = 2.0 * m * n * d
    settle()
    numpy_s = best_of(lambda: np.matmul(a, b.T, out=out), repeats + 1)  # the first run warms up
    settle()
    torch_s = best_of(lambda: torch.mm(ta, tb.T, out=tout), repeats + 1)
    return {"numpy": flops / numpy_s / 1e9, "torch": flops / torch_s / 1e9}


def run_case(n_q: int, n_img: int, dim: int, k: int, repeats: int, plan_args: dict) -> dict:
    rng = np.random.default_rng(1)
    q, x = unit_rows(rng, n_q, dim), unit_rows(rng, n_img, dim)
    src = ArraySource(np.arange(n_img), x)
    plan = plan_blocks(n_q, n_img, dim, k, **plan_args)
    flops = 2.0 * n_q * n_img * dim
    ours_t, faiss_t, gemm = float("inf"), float("inf"), {"numpy": 0.0, "torch": 0.0}
    index = None
    if faiss is not None:
        index = faiss.IndexFlatIP(dim)
        index.add(x)
    result = None
    shapes = {(plan.query_chunk, plan.image_block), (4096, 4096), (2048, 16384)}
    for _ in range(repeats):  # interleaved, best of each
        for m, n in shapes:  # the limit: the best GEMM rate at any of these shapes
            g = gemm_gflops(m, n, dim, 1)
            gemm = {key: max(gemm[key], g[key]) for key in g}
        settle()
        t = time.perf_counter()
        result = search(q, src, k, plan)
        ours_t = min(ours_t, time.perf_counter() - t)
        if index is not None:
            settle()
            t = time.perf_counter()
            _, fi = index.search(q, k)
            faiss_t = min(faiss_t, time.perf_counter() - t)
    limit_gflops = max(gemm.values())
    numpy_limit_s = flops / gemm["numpy"] / 1e9
    out = {"queries": n_q, "images": n_img, "dim": dim, "k": k, "plan": [plan.query_chunk, plan.image_block],
           "ours_s": ours_t, "ours_gflops": flops / ours_t / 1e9,
           "gemm_gflops_numpy": gemm["numpy"], "gemm_gflops_torch": gemm["torch"],
           "limit_s": flops / limit_gflops / 1e9, "fraction_of_matmul_limit": flops / limit_gflops / 1e9 / ours_t,
           "numpy_limit_s": numpy_limit_s, "fraction_of_numpy_limit": numpy_limit_s / ours_t}
    if index is not None:
        # Random unit vectors have no ties, so the id sets must agree (up to ~1 ulp reorderings).
        agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(result[1].numpy(), fi)]))
        out.update(faiss_s=faiss_t, faiss_over_ours=faiss_t / ours_t, faiss_agreement=agree,
                   faiss_fraction_of_matmul_limit=flops / limit_gflops / 1e9 / faiss_t,
                   faiss_fraction_of_numpy_limit=numpy_limit_s / faiss_t)
    return out


def run_selection_share(n_q: int, n_img: int, dim: int, k: int, repeats: int, plan_args: dict) -> dict:
    """One lane on one BLAS thread, over the planned tiles: the bare matmul loop, then the same loop
    with each selection (the C scan, numpy's), best of repeats each, interleaved. The difference is
    what the selection costs, as a share of the matmul."""
    from engine.retrieval.blas_threads import single_thread_blas
    from engine.retrieval.cpu_topk import HeapTopK, RunningTopK
    from engine.retrieval.native_scan import kernel

    rng = np.random.default_rng(4)
    q, x = unit_rows(rng, n_q, dim), unit_rows(rng, n_img, dim)
    plan = plan_blocks(n_q, n_img, dim, k, **plan_args)
    tq, ti = plan.tile_queries, plan.tile_images
    out = np.empty(tq * ti, np.float32)
    scan = kernel()
    makers = {"matmul only": lambda: None, "numpy": lambda: RunningTopK(n_q, k, plan.tile_group)}
    if scan is not None:
        makers["C scan"] = lambda: HeapTopK(n_q, k, scan)

    def loop(top) -> None:
        for q0 in range(0, n_q, tq):
            for t0 in range(0, n_img, ti):
                tile = x[t0:t0 + ti]
                s = out[: len(tile) * min(tq, n_q - q0)].reshape(len(tile), -1)
                np.matmul(tile, q[q0:q0 + tq].T, out=s)
                if top is not None:
                    top.add_tile(s, q0, t0)
        if top is not None:
            top.flush()

    best = {name: float("inf") for name in makers}
    with single_thread_blas():
        for _ in range(repeats):
            for name, make in makers.items():
                top = make()
                t = time.perf_counter()
                loop(top)
                best[name] = min(best[name], time.perf_counter() - t)
    bare = best["matmul only"]
    return {"queries": n_q, "images": n_img, "tile": [ti, tq], "seconds": best,
            "share_of_matmul": {name: (v - bare) / bare for name, v in best.items() if name != "matmul only"}}


# Runs a script (a path, or -c CODE) and then prints the process's peak RSS. Read from VmHWM, the
# peak of the memory map exec made: getrusage's maxrss would also count the benchmark's own RSS,
# which the child held between fork and exec.
PEAK_WRAPPER = """
import runpy, sys
if sys.argv[1] == "-c":
    code, sys.argv = sys.argv[2], ["-c"] + sys.argv[3:]
else:
    code, sys.argv = None, sys.argv[1:]
try:
    exec(compile(code, "<script>", "exec"), {"__name__": "__main__"}) if code else runpy.run_path(
        sys.argv[0], run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        sys.stderr.write("".join(line for line in f if line.startswith("VmHWM")))
"""


def run_with_peak(cmd):
    """Run [python, script-or--c, args...]; (the finished process, its peak RSS in MB)."""
    proc = subprocess.run([cmd[0], "-c", PEAK_WRAPPER, *cmd[1:]], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    hwm = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("VmHWM")]
    return proc, int(hwm[-1]) / 1024 if hwm else None


def run_large(n_q: int, n_img: int, dim: int, k: int, workdir: Path, shard_rows: int,
              max_memory_mb: float, threads: int, with_faiss: bool) -> dict:
    """Write n_img image features as npz shards on disk, then time launch/retrieve.py streaming
    them, and read its peak RSS (a child process, so this process's arrays do not count); then
    (with_faiss) the faiss script on the same shards: both whole processes, run one after the
    other, once each."""
    rng = np.random.default_rng(2)
    img_dir = workdir / "img"
    n_shards = -(-n_img // shard_rows)
    t = time.perf_counter()
    for s in range(n_shards):
        a, b = s * shard_rows, min(n_img, (s + 1) * shard_rows)
        save_features(img_dir / shard_name(s, n_shards), np.arange(a, b), unit_rows(rng, b - a, dim))
    save_features(workdir / "txt.npz", np.arange(n_q), unit_rows(rng, n_q, dim))
    gen_s = time.perf_counter() - t
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(repo / "launch/retrieve.py"), "--image-feats", str(img_dir), "--text-feats",
           str(workdir / "txt.npz"), "--top-k", str(k), "--output", str(workdir / "pred.jsonl"),
           "--max-memory-mb", str(max_memory_mb), "--no-progress"]
    t = time.perf_counter()
    proc, peak_mb = run_with_peak(cmd)
    wall = time.perf_counter() - t
    out = {"queries": n_q, "images": n_img, "dim": dim, "k": k, "shards": n_shards,
           "max_memory_mb": max_memory_mb, "cli_wall_s": wall,
           "gflops": 2.0 * n_q * n_img * dim / wall / 1e9,
           "peak_rss_mb": peak_mb, "data_gen_s": gen_s, "cli_output": proc.stdout.strip()}
    if with_faiss and faiss is not None:  # the same shards through the minimal faiss script, once
        t = time.perf_counter()
        proc, out["faiss_peak_rss_mb"] = run_with_peak(
            [sys.executable, "-c", FAISS_SCRIPT, str(img_dir), str(workdir / "txt.npz"), str(k), str(threads),
             str(workdir / "faiss_ids.npy")])
        out["faiss_wall_s"] = time.perf_counter() - t
        pred = [json.loads(line)["item_ids"] for line in open(workdir / "pred.jsonl")]
        fids = np.load(workdir / "faiss_ids.npy").tolist()
        out["ours_over_faiss"] = wall / out["faiss_wall_s"]
        out["faiss_agreement"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(pred, fids)]))
    return out


FAISS_SCRIPT = """
import os, sys, numpy as np, faiss
faiss.omp_set_num_threads(int(sys.argv[4]))
def load(p):
    if os.path.isdir(p):  # a folder of shards, in name order (part-00000-of-...)
        parts = [load(os.path.join(p, f)) for f in sorted(os.listdir(p)) if f.endswith(".npz")]
        return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
    z = np.load(p)
    return z["ids"], np.ascontiguousarray(z["feats"], dtype=np.float32)
img_ids, img = load(sys.argv[1])
q_ids, q = load(sys.argv[2])
index = faiss.IndexFlatIP(img.shape[1])
index.add(img)
_, rows = index.search(q, int(sys.argv[3]))
np.save(sys.argv[5], img_ids[rows])
"""


def run_processes(n_q: int, n_img: int, dim: int, k: int, repeats: int, threads: int,
                  workdir: Path) -> dict:
    """Whole processes on the same npz files, alternated: launch/retrieve.py against a minimal
    faiss IndexFlatIP script (load, index, search, save). Python start and imports count."""
    rng = np.random.default_rng(3)
    save_features(workdir / "img.npz", np.arange(n_img), unit_rows(rng, n_img, dim))
    save_features(workdir / "txt.npz", np.arange(n_q), unit_rows(rng, n_q, dim))
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    ours = [sys.executable, str(repo / "launch/retrieve.py"), "--image-feats", str(workdir / "img.npz"),
            "--text-feats", str(workdir / "txt.npz"), "--top-k", str(k), "--output",
            str(workdir / "pred.jsonl"), "--no-progress", "--device", "cpu"]
    theirs = [sys.executable, "-c", FAISS_SCRIPT, str(workdir / "img.npz"), str(workdir / "txt.npz"),
              str(k), str(threads), str(workdir / "faiss_ids.npy")]
    times = {"ours": [], "faiss": []}
    for _ in range(repeats):
        for name, cmd in (("ours", ours), ("faiss", theirs)):
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            times[name].append(time.perf_counter() - t)
            if proc.returncode != 0:
                raise SystemExit(proc.stdout + proc.stderr)
    pred = [json.loads(line)["item_ids"] for line in open(workdir / "pred.jsonl")]
    fids = np.load(workdir / "faiss_ids.npy")
    agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(pred, fids.tolist())]))
    ratios = [o / f for o, f in zip(times["ours"], times["faiss"])]
    return {"queries": n_q, "images": n_img, "ours_process_s": times["ours"], "faiss_process_s": times["faiss"],
            "ours_over_faiss": ratios, "median_ours_over_faiss": float(np.median(ratios)), "agreement": agree}


def _spread(xs) -> str:
    return f"{np.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=THREADS_DEFAULT, help="BLAS/torch/faiss threads")
    p.add_argument("--sizes", nargs="*", default=["5000x30000", "20000x100000"],
                   help="QxN cases (none: only --large)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--large", type=int, nargs=2, metavar=("Q", "N"), default=None,
                   help="also run launch/retrieve.py on Q x N streamed from disk (e.g. 100000 1000000)")
    p.add_argument("--large-shard-rows", type=int, default=100_000)
    p.add_argument("--large-no-faiss", action="store_true", help="--large without the faiss script's run")
    p.add_argument("--max-memory-mb", type=float, default=2048)
    p.add_argument("--query-chunk", type=int, default=None, help="override the planned block sizes")
    p.add_argument("--image-block", type=int, default=None)
    p.add_argument("--group", type=int, default=None)
    p.add_argument("--workdir", default=None, help="where --large writes its features (default: a temp dir)")
    p.add_argument("--processes", action="store_true",
                   help="also time whole processes per size: launch/retrieve.py vs a faiss script on npz files")
    p.add_argument("--selection", action="store_true",
                   help="also time the selection alone per size: one lane, one thread, C scan vs numpy vs bare matmul")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    if a.workdir:  # a scratch folder of the user's choosing (e.g. on a big disk): made if absent
        Path(a.workdir).mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(a.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(a.threads)
    print(f"threads {a.threads}, torch {torch.__version__}, numpy {np.__version__}, "
          f"faiss {faiss.__version__ if faiss else 'not installed'}", flush=True)
    results = {"threads": a.threads, "cases": [], "large": None}
    plan_args = {key: v for key, v in (("query_chunk", a.query_chunk), ("image_block", a.image_block),
                                        ("group", a.group), ("max_memory_mb", a.max_memory_mb)) if v}
    for size in a.sizes:
        n_q, n_img = (int(v) for v in size.lower().split("x"))
        r = run_case(n_q, n_img, a.dim, a.k, a.repeats, plan_args)
        results["cases"].append(r)
        faiss_part = (f" | faiss {r['faiss_s']:.3f}s ({r['faiss_fraction_of_numpy_limit']:.2f} / "
                      f"{r['faiss_fraction_of_matmul_limit']:.2f}), "
                      f"faiss/ours time {r['faiss_over_ours']:.2f}, id agreement {r['faiss_agreement']:.4f}"
                      if "faiss_s" in r else " | faiss n/a")
        print(f"{n_q} x {n_img} x {a.dim}: ours {r['ours_s']:.3f}s = {r['ours_gflops']:.0f} GFLOP/s, "
              f"{r['fraction_of_numpy_limit']:.2f} of numpy's matmul limit / {r['fraction_of_matmul_limit']:.2f} "
              f"of the best (GEMM numpy {r['gemm_gflops_numpy']:.0f}, torch {r['gemm_gflops_torch']:.0f} GFLOP/s)"
              + faiss_part, flush=True)
    if a.selection:
        results["selection"] = []
        for size in a.sizes:
            n_q, n_img = (int(v) for v in size.lower().split("x"))
            r = run_selection_share(n_q, n_img, a.dim, a.k, a.repeats, plan_args)
            results["selection"].append(r)
            shares = ", ".join(f"{name} {v:.3f} s (+{r['share_of_matmul'].get(name, 0) * 100:.1f} %)"
                               for name, v in r["seconds"].items())
            print(f"selection alone, one lane on one thread, {n_q} x {n_img}, tiles {r['tile'][0]} x "
                  f"{r['tile'][1]}: {shares}", flush=True)
    if a.processes:
        results["processes"] = []
        for size in a.sizes:
            n_q, n_img = (int(v) for v in size.lower().split("x"))
            with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
                r = run_processes(n_q, n_img, a.dim, a.k, a.repeats, a.threads, Path(tmp))
            results["processes"].append(r)
            print(f"whole process {n_q} x {n_img} x {a.dim}, median (min-max) of {a.repeats}: "
                  f"retrieve.py {_spread(r['ours_process_s'])}s, faiss script {_spread(r['faiss_process_s'])}s, "
                  f"ours/faiss {_spread(r['ours_over_faiss'])}, id agreement {r['agreement']:.4f}", flush=True)
    if a.large:
        with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
            r = run_large(a.large[0], a.large[1], a.dim, a.k, Path(tmp), a.large_shard_rows, a.max_memory_mb,
                          a.threads, not a.large_no_faiss)
        results["large"] = r
        faiss_part = (f"; faiss script on the same shards {r['faiss_wall_s']:.1f}s (peak RSS "
                      f"{r['faiss_peak_rss_mb']:.0f} MB), ours/faiss "
                      f"{r['ours_over_faiss']:.2f}, id agreement {r['faiss_agreement']:.4f}" if "faiss_wall_s" in r else "")
        print(f"streamed CLI {r['queries']} x {r['images']} x {a.dim} from {r['shards']} npz shards: "
              f"{r['cli_wall_s']:.1f}s ({r['gflops']:.0f} GFLOP/s end to end incl. loading), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB with --max-memory-mb {r['max_memory_mb']:.0f}" + faiss_part,
              flush=True)
    print(f"this process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
