"""Building and loading the C top-k scan (engine/topk_native.py): cached per source and CPU, built
atomically, and where it cannot be built the search falls back to numpy's selection with a
warning and the same results."""
import logging
import subprocess
import sys

import numpy as np
import pytest

import engine.topk_native as native
from engine.topk_cpu import search_blocks


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
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from engine.topk_native import kernel; "
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
    with caplog.at_level(logging.WARNING, logger="engine.topk_native"):
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
    with caplog.at_level(logging.WARNING, logger="engine.topk_native"):
        got = grid_search(native_flag=None)
    assert native.kernel() is None and "could not build topk_heap.c" in caplog.text
    want = grid_search(native_flag=False)
    np.testing.assert_array_equal(got[1], want[1])


def test_turned_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("CLIP_TOPK_NATIVE", "0")
    assert native.kernel() is None
    assert not fresh.exists()  # nothing built


def test_bad_tiles_are_refused(fresh):
    from engine.topk_cpu import HeapTopK

    top = HeapTopK(4, 2, native.kernel())
    with pytest.raises(ValueError, match="C-contiguous float32"):
        top.add_tile(np.zeros((3, 4), np.float64), 0, 0)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        top.add_tile(np.zeros((4, 3), np.float32).T, 0, 0)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        top.add_tile(np.zeros((3, 4), np.float32), 1, 0)  # queries 1..4 of a top-k of 4
