"""Building and loading the C top-k scan (engine/retrieval/native_scan.py): cached per source and CPU, built
atomically, and where it cannot be built the search falls back to numpy's selection with a
warning and the same results."""
import logging
import platform
import subprocess
import sys

import numpy as np
import pytest

import engine.retrieval.native_scan as native
from engine.retrieval.cpu_topk import HeapTopK, search_blocks


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A clean loader state and an empty cache directory of its own."""
    monkeypatch.setattr(native, "_kernel", None)
    monkeypatch.setenv("CLIP_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLIP_TOPK_NATIVE", raising=False)
    return tmp_path / "cache"


def grid_search(native_flag):
    rng = np.random.default_rng(2)
    q = (rng.integers(-2, 3, (40, 8)) / 8).astype(np.float32)
    x = (rng.integers(-2, 3, (300, 8)) / 8).astype(np.float32)
    return search_blocks(q, lambda b: (b * 100, x[b * 100:(b + 1) * 100]), [0, 1, 2], 10, 16, 32, 4,
                         native=native_flag)


def test_built_once_into_the_cache_and_reused(fresh):
    assert native.kernel() is not None
    libs = list(fresh.glob("topk_heap-*.so"))
    assert len(libs) == 1 and not list(fresh.glob("*.tmp*"))  # no temporary file left behind
    built_at = libs[0].stat().st_mtime_ns
    native._kernel = None  # a new process: finds the library, does not build again
    assert native.kernel() is not None and libs[0].stat().st_mtime_ns == built_at


def test_another_cpu_gets_its_own_library(fresh, monkeypatch):
    """-march=native code must not be handed to a node with other CPU features (shared home)."""
    assert native.kernel() is not None
    monkeypatch.setattr(native, "_kernel", None)
    monkeypatch.setattr(native, "_cpu_features", lambda: "flags : fpu sse2 (another cpu)")
    assert native.kernel() is not None
    assert len(list(fresh.glob("topk_heap-*.so"))) == 2


def test_ranks_building_at_once_all_load_it(fresh, repo_root):
    """Four processes start with an empty cache at the same time, as the ranks of a job do."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from engine.retrieval.native_scan import kernel; "
            "assert kernel() is not None")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(repo_root)], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    assert len(list(fresh.glob("topk_heap-*.so"))) == 1 and len(list(fresh.iterdir())) == 1


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_numpy_selects_the_same(fresh, monkeypatch, caplog, cc):
    want = grid_search(native_flag=False)
    monkeypatch.setenv("CC", cc)
    with caplog.at_level(logging.WARNING, logger="engine.retrieval.native_scan"):
        got = grid_search(native_flag=None)
    assert native.kernel() is None
    assert "numpy's selection, ~5% slower" in caplog.text
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    with pytest.raises(RuntimeError, match="not available"):
        grid_search(native_flag=True)


def test_a_cache_that_cannot_be_written_falls_back(fresh, monkeypatch, caplog, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("CLIP_NATIVE_CACHE", str(blocker / "native"))
    with caplog.at_level(logging.WARNING, logger="engine.retrieval.native_scan"):
        got = grid_search(native_flag=None)
    assert native.kernel() is None and "could not build topk_heap.c" in caplog.text
    want = grid_search(native_flag=False)
    np.testing.assert_array_equal(got[1], want[1])


def test_turned_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("CLIP_TOPK_NATIVE", "0")
    assert native.kernel() is None
    assert not fresh.exists()  # nothing built


def test_bad_tiles_are_refused(fresh):
    from engine.retrieval.cpu_topk import HeapTopK

    top = HeapTopK(4, 2, native.kernel())
    with pytest.raises(ValueError, match="C-contiguous float32"):
        top.add_tile(np.zeros((3, 4), np.float64), 0, 0)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        top.add_tile(np.zeros((4, 3), np.float32).T, 0, 0)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        top.add_tile(np.zeros((3, 4), np.float32), 1, 0)  # queries 1..4 of a top-k of 4


def _cpu_has(flag: str) -> bool:
    return f" {flag}" in native._cpu_features()


# Every vector width the C scan has, so that the code another CPU runs is tested here too.
WIDTHS = {"avx512 (16)": (["-O3", "-mavx512f"], "avx512f"),
          "avx (8)": (["-O3", "-mavx2", "-mno-avx512f"], "avx2"),
          "sse2 (4)": (["-O3", "-mno-avx"], "sse2"),
          "scalar (1)": (["-O3", "-DTOPK_SCALAR"], None)}


@pytest.mark.parametrize("width", list(WIDTHS))
def test_each_vector_width_equals_the_oracle(fresh, width):
    """37 queries (not a multiple of any width: the tail loop runs too), tied grid scores, rows
    climbing in plateaus so that tied k-th places are displaced; tiles of 1 to 50 rows."""
    flags, cpu_flag = WIDTHS[width]
    if cpu_flag and (platform.machine() not in ("x86_64", "AMD64") or not _cpu_has(cpu_flag)):
        pytest.skip(f"this CPU cannot run {width}")
    scan = native.load(native._build(native._compiler(), native.SOURCE.read_bytes(), [flags]))
    rng = np.random.default_rng(11)
    n, d, m = 400, 8, 37
    x = ((rng.integers(0, 3, (n, d)) + np.arange(n)[:, None] // 9) / 8).astype(np.float32)
    q = (rng.integers(-1, 3, (m, d)) / 8).astype(np.float32)
    scores = x @ q.T  # exact: multiples of 1/64
    for k, tile in ((10, 50), (3, 1), (25, 7)):
        top = HeapTopK(m, k, scan)
        for r0 in range(0, n, tile):
            top.add_tile(np.ascontiguousarray(scores[r0:r0 + tile]), 0, r0)
        vals, rows = top.result()
        want = np.stack([np.lexsort((np.arange(n), -scores[:, c]))[:k] for c in range(m)])
        np.testing.assert_array_equal(rows, want, err_msg=f"k={k}, tile={tile}")
        np.testing.assert_array_equal(vals, np.take_along_axis(scores.T, want, 1))
