"""The CPU tiled top-k (engine/retrieval/cpu_topk.py) against a full-sort oracle, at tile shapes that stress
its shortcuts: ties split across tile boundaries, k larger than a tile, fewer images than k. Each
search runs twice: with the C scan (HeapTopK) and with numpy's selection (RunningTopK)."""
import numpy as np
import pytest

from engine.inference.feature_files import ArraySource
from engine.retrieval.search import plan_blocks, search
from engine.retrieval.cpu_topk import SENTINEL, HeapTopK, RunningTopK, search_blocks
from engine.retrieval.native_scan import kernel


@pytest.fixture(params=[True, False], ids=["c-scan", "numpy"])
def native(request):
    """Which selection search_blocks uses; the C one must build here (a compiler is required)."""
    if request.param:
        assert kernel() is not None, "the C top-k scan did not build (see the log)"
    return request.param


def oracle(q, x, k):
    """float64 scores, then lexsort by (-score, row); padded with (-inf, SENTINEL) past N."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    rows = np.stack([np.lexsort((np.arange(len(x)), -r))[:k] for r in s])
    vals = np.take_along_axis(s, rows, 1)
    pad = k - rows.shape[1]
    return (np.pad(vals, ((0, 0), (0, pad)), constant_values=-np.inf),
            np.pad(rows, ((0, 0), (0, pad)), constant_values=SENTINEL))


def tied_images(rng, n, d, distinct=7):
    """Rows drawn from a few distinct grid vectors (multiples of 1/8: exact dot products), so
    equal scores fall in every tile and across every tile boundary."""
    base = (rng.integers(-2, 3, (distinct, d)) / 8).astype(np.float32)
    return base[rng.integers(0, distinct, n)]


@pytest.mark.parametrize("k,tq,ti,g", [
    (10, 7, 48, 4),    # groups of 4 strided columns, k-th group max bound on the first tile
    (10, 16, 64, 16),  # w = 4 < k: the first tile takes every entry
    (25, 5, 8, 2),     # k larger than a tile: rows stay 'not full' over several tiles
    (3, 64, 1, 1),     # one image per tile
    (10, 3, 40, 8),    # query chunk not dividing Q, tile not dividing the block
])
def test_tiles_equal_oracle_with_ties_across_tiles(k, tq, ti, g, native):
    rng = np.random.default_rng(k * 1000 + ti)
    q = (rng.integers(-2, 3, (23, 16)) / 8).astype(np.float32)
    x = tied_images(rng, 333, 16)
    blocks = [0, 1, 2]  # uneven blocks of 120, 120, 93 rows

    def read(b):
        return b * 120, x[b * 120:(b + 1) * 120]

    vals, rows = search_blocks(q, read, blocks, k, tq, ti, g, native=native)
    want_v, want_r = oracle(q, x, k)
    np.testing.assert_array_equal(rows, want_r)
    np.testing.assert_array_equal(vals, want_v.astype(np.float32))


@pytest.mark.parametrize("k,ti", [(3, 16), (10, 40), (10, 1)])
def test_ties_at_the_cut_then_better_entries(k, ti, native):
    """Scores that climb in plateaus: the k-th place is tied when a better entry arrives, and the
    tied entry with the highest row must be the one that leaves. Queries are one-hot, so each
    query's scores are one column of the images, exactly."""
    rng = np.random.default_rng(k * 10 + ti)
    n, d = 300, 24
    x = ((rng.integers(0, 3, (n, d)) + np.arange(n)[:, None] // 7) / 8).astype(np.float32)
    q = np.eye(d, dtype=np.float32)
    vals, rows = search_blocks(q, lambda b: (b * 100, x[b * 100:(b + 1) * 100]), [0, 1, 2], k, 8, ti, 2,
                               native=native)
    want_v, want_r = oracle(q, x, k)
    np.testing.assert_array_equal(rows, want_r)
    np.testing.assert_array_equal(vals, want_v.astype(np.float32))


def test_fewer_images_than_k_pads_with_sentinels(native):
    rng = np.random.default_rng(5)
    q, x = tied_images(rng, 4, 8), tied_images(rng, 6, 8)
    vals, rows = search_blocks(q, lambda b: (0, x), [0], 10, 4, 4, 2, native=native)
    want_v, want_r = oracle(q, x, 10)
    np.testing.assert_array_equal(rows, want_r)
    np.testing.assert_array_equal(vals, want_v.astype(np.float32))


def test_zero_and_negative_zero_scores_tie_by_row(native):
    top = HeapTopK(1, 3, kernel()) if native else RunningTopK(1, 3, 1)  # tiles: [images, queries]
    top.add_tile(np.array([[-0.0], [1.0]], np.float32), 0, 0)
    top.add_tile(np.array([[0.0], [-0.0]], np.float32), 0, 2)
    top.flush()
    assert top.result()[1].tolist() == [[1, 0, 2]]


def test_blocks_out_of_order_are_refused():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="ascending"):
        search_blocks(x, lambda b: (b * 2, x[b * 2:b * 2 + 2]), [1, 0], 1, 4, 2, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_search_with_default_tiles_equals_oracle(dtype):
    """The planned tiles (wider than these images) through the public search()."""
    rng = np.random.default_rng(6)
    q, x = tied_images(rng, 300, 32).astype(dtype), tied_images(rng, 5000, 32).astype(dtype)
    plan = plan_blocks(300, 5000, 32, 10, image_block=3000)
    vals, rows = search(q, ArraySource(np.arange(5000), x), 10, plan)
    want_v, want_r = oracle(q, x, 10)
    np.testing.assert_array_equal(rows.numpy(), want_r)
    np.testing.assert_array_equal(vals.numpy(), want_v.astype(np.float32))


def test_cli_in_one_cpu_process_does_not_import_torch(tmp_path):
    """launch/retrieve.py without a launcher on the CPU: oracle results, and torch never loaded."""
    import json
    import os
    import re
    import subprocess
    import sys

    from engine.inference.feature_files import save_features

    rng = np.random.default_rng(8)
    q, x = tied_images(rng, 13, 16), tied_images(rng, 700, 16)
    save_features(tmp_path / "img.npz", np.arange(700) + 5, x)
    save_features(tmp_path / "txt.npz", np.arange(13), q)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {key: v for key, v in os.environ.items() if key not in ("WORLD_SIZE", "RANK")}
    proc = subprocess.run([sys.executable, "-X", "importtime", os.path.join(repo, "launch/retrieve.py"),
                           "--image-feats", str(tmp_path / "img.npz"), "--text-feats", str(tmp_path / "txt.npz"),
                           "--top-k", "10", "--device", "cpu", "--no-progress", "--output", str(tmp_path / "p.jsonl")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not re.search(r"\|\s+torch(\.|$)", proc.stderr, re.M), "torch was imported"
    got = [json.loads(line)["item_ids"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert got == (oracle(q, x, 10)[1] + 5).tolist()


def test_rows_left_after_whole_groups_are_searched_too(native):
    """Tiles of 30 rows with groups of 4: 28 rows by group maxima, the last 2 one by one."""
    rng = np.random.default_rng(9)
    q, x = tied_images(rng, 9, 16), tied_images(rng, 150, 16)
    vals, rows = search_blocks(q, lambda b: (b * 75, x[b * 75:(b + 1) * 75]), [0, 1], 3, 9, 30, 4,
                               native=native)
    want_v, want_r = oracle(q, x, 3)
    np.testing.assert_array_equal(rows, want_r)
    np.testing.assert_array_equal(vals, want_v.astype(np.float32))


@pytest.mark.parametrize("lanes,tq", [(2, 16), (3, 16), (3, 100), (4, 64)])
def test_lanes_equal_oracle(lanes, tq, native):
    """Queries split over lane threads (whole chunks each, uneven when the chunks do not divide)
    give the one-lane result, ties across tiles included, and the BLAS threads come back."""
    from engine.retrieval.blas_threads import blas_threads
    from engine.retrieval.cpu_topk import lane_bounds

    rng = np.random.default_rng(lanes * 100 + tq)
    q, x = tied_images(rng, 300, 16), tied_images(rng, 700, 16)
    bounds = lane_bounds(300, tq, lanes)
    assert len(bounds) == min(lanes, -(-300 // tq)) and bounds[0][0] == 0 and bounds[-1][1] == 300
    assert all(a % tq == 0 and b > a for a, b in bounds)  # whole chunks, none empty
    before = blas_threads()
    vals, rows = search_blocks(q, lambda b: (b * 256, x[b * 256:(b + 1) * 256]), [0, 1, 2], 10, tq, 48, 4,
                               lanes=lanes, native=native)
    assert blas_threads() == before
    want_v, want_r = oracle(q, x, 10)
    np.testing.assert_array_equal(rows, want_r)
    np.testing.assert_array_equal(vals, want_v.astype(np.float32))


def test_a_failing_lane_fails_the_search_and_restores_blas(monkeypatch):
    import threading

    import engine.retrieval.cpu_topk as topk_cpu
    from engine.retrieval.blas_threads import blas_threads

    real = topk_cpu._Lane.search_block

    def fails_in_lane_thread(self, block, r0):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("lane broke")
        real(self, block, r0)

    monkeypatch.setattr(topk_cpu._Lane, "search_block", fails_in_lane_thread)
    rng = np.random.default_rng(3)
    q, x = tied_images(rng, 256, 8), tied_images(rng, 100, 8)
    before = blas_threads()
    with pytest.raises(RuntimeError, match="lane broke"):
        search_blocks(q, lambda b: (0, x), [0], 5, 64, 32, 4, lanes=2)
    assert blas_threads() == before


def test_sort_keys_order_and_decode():
    """The uint64 keys sort as (score desc, row asc) and give the scores back (-0.0 as 0.0)."""
    from engine.retrieval.cpu_topk import PAD_KEY, _key_scores, _sort_key

    rng = np.random.default_rng(4)
    v = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-30, 30, 500),
                        np.float32([0.0, -0.0, 1.0, 1.0, -1.0, np.finfo(np.float32).max])]).astype(np.float32)
    r = rng.integers(0, 2**32 - 1, len(v))
    keys = _sort_key(v, r)
    np.testing.assert_array_equal(np.argsort(keys, kind="stable"), np.lexsort((r, -v.astype(np.float64))))
    np.testing.assert_array_equal(_key_scores(keys), v + np.float32(0.0))
    assert _key_scores(np.array([PAD_KEY]))[0] == -np.inf and (keys < PAD_KEY).all()


def test_blas_thread_section_is_one_thread_and_restored():
    from engine.retrieval.blas_threads import blas_threads, single_thread_blas

    before = blas_threads()
    if before is None:
        pytest.skip("numpy's BLAS threads cannot be set here")
    with single_thread_blas() as saved:
        assert saved == before and blas_threads() == 1
        with single_thread_blas():  # nested: still one, and the outer exit restores
            assert blas_threads() == 1
        assert blas_threads() == 1
    assert blas_threads() == before
