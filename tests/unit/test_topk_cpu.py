"""The CPU tiled top-k (engine/topk_cpu.py) against a full-sort oracle, at tile shapes that stress
its shortcuts: ties split across tile boundaries, k larger than a tile, fewer images than k."""
import numpy as np
import pytest

from engine.features import ArraySource
from engine.retrieval import plan_blocks, search
from engine.topk_cpu import SENTINEL, RunningTopK, search_blocks


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
def test_tiles_equal_oracle_with_ties_across_tiles(k, tq, ti, g):
    rng = np.random.default_rng(k * 1000 + ti)
    q = (rng.integers(-2, 3, (23, 16)) / 8).astype(np.float32)
    x = tied_images(rng, 333, 16)
    blocks = [0, 1, 2]  # uneven blocks of 120, 120, 93 rows

    def read(b):
        return b * 120, x[b * 120:(b + 1) * 120]

    vals, rows = search_blocks(q, read, blocks, k, tq, ti, g)
    want_v, want_r = oracle(q, x, k)
    np.testing.assert_array_equal(rows, want_r)
    np.testing.assert_array_equal(vals, want_v.astype(np.float32))


def test_fewer_images_than_k_pads_with_sentinels():
    rng = np.random.default_rng(5)
    q, x = tied_images(rng, 4, 8), tied_images(rng, 6, 8)
    vals, rows = search_blocks(q, lambda b: (0, x), [0], 10, 4, 4, 2)
    want_v, want_r = oracle(q, x, 10)
    np.testing.assert_array_equal(rows, want_r)
    np.testing.assert_array_equal(vals, want_v.astype(np.float32))


def test_zero_and_negative_zero_scores_tie_by_row():
    top = RunningTopK(1, 3, 1)
    top.add_tile(np.array([[-0.0, 1.0]], np.float32), 0, 0)
    top.add_tile(np.array([[0.0, -0.0]], np.float32), 0, 2)
    top.flush()
    assert top.rows.tolist() == [[1, 0, 2]]


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

    from engine.features import save_features

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
