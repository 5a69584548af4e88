"""Exact top-k against a full-sort oracle, the feature file formats, and atomic outputs."""
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from data.files import InputError
from engine.inference.feature_files import (ArraySource, load_features, open_features, save_features, shard_name,
                                            write_feature_jsonl)
from engine.retrieval.search import canonical_topk, distributed_search, merge_topk, plan_blocks, search
from engine.scoring.predictions import write_predictions


def oracle_rows(q, x, k):
    """Full float64 score matrix, then lexsort by (-score, row): the canonical order."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    rows = np.arange(x.shape[0])
    return np.stack([np.lexsort((rows, -r))[:k] for r in s])


def grid_features(rng, n, d, dtype=np.float32, levels=3):
    """Multiples of 1/8 with few levels: every dot product is exact in fp16/fp32 whatever the
    summation order, and equal scores (ties) are common."""
    return (rng.integers(-levels, levels + 1, (n, d)) / 8).astype(dtype)


def gaussian(rng, n, d, dtype=np.float32):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


@pytest.mark.parametrize("seed", range(6))
def test_canonical_topk_matches_lexsort_with_ties(seed):
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(1, 30)), int(rng.integers(1, 200))
    k = int(rng.integers(1, n + 1))
    v = rng.integers(0, 4, (m, n)).astype(np.float32)  # heavy ties
    vals, cols = canonical_topk(torch.from_numpy(v), k)
    want = np.stack([np.lexsort((np.arange(n), -row))[:k] for row in v])
    np.testing.assert_array_equal(cols.numpy(), want)
    np.testing.assert_array_equal(vals.numpy(), np.take_along_axis(v, want, 1))


def test_merge_topk_orders_ties_by_row_whatever_the_input_order():
    vals = torch.tensor([[1.0, 2.0, 2.0, 1.0, 2.0]])
    rows = torch.tensor([[7, 9, 3, 1, 5]])
    v, r = merge_topk(vals, rows, 4)
    assert r.tolist() == [[3, 5, 9, 1]]
    assert v.tolist() == [[2.0, 2.0, 2.0, 1.0]]


@pytest.mark.parametrize("torch_blocks", [False, True], ids=["cpu-tiles", "torch-blocks"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("data", ["grid", "gaussian"])
def test_search_equals_oracle_odd_sizes(dtype, data, torch_blocks):
    """Both searches: the CPU's tiles, and the torch blocks a GPU runs (here on the CPU)."""
    rng = np.random.default_rng(1 if data == "grid" else 2)
    make = grid_features if data == "grid" else gaussian
    cases = [  # (Q, N, D, k, query_chunk, image_block, group)
        (37, 1001, 24, 10, 8, 96, 4),    # grouped path, last block partial
        (5, 257, 7, 3, 2, 13, 1),        # ungrouped, block size not dividing N
        (64, 300, 16, 10, 64, 300, 64),  # one block smaller than group * k: searched whole
        (3, 12, 5, 12, 3, 5, 1),         # k == N, blocks smaller than k
        (50, 2000, 32, 7, 17, 640, 32),  # several grouped blocks
    ]
    for Q, N, D, k, qc, nb, g in cases:
        q, x = make(rng, Q, D, dtype), make(rng, N, D, dtype)
        plan = plan_blocks(Q, N, D, k, query_chunk=qc, image_block=nb, group=g)
        vals, rows = search(q, ArraySource(np.arange(N) * 10, x), k, plan, torch_blocks=torch_blocks)
        want = oracle_rows(q, x, k)
        np.testing.assert_array_equal(rows.numpy(), want, err_msg=str((Q, N, D, k, qc, nb, g)))
        exact = np.take_along_axis(q.astype(np.float64) @ x.astype(np.float64).T, want, 1)
        np.testing.assert_allclose(vals.numpy(), exact, rtol=0, atol=1e-5)


def test_search_over_npz_shards_that_do_not_divide_n(tmp_path):
    rng = np.random.default_rng(3)
    q, x = grid_features(rng, 29, 12), grid_features(rng, 1003, 12)
    ids = rng.permutation(50_000)[:1003]
    bounds = [0, 1, 400, 401, 777, 1003]  # includes a 1-row shard
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        save_features(tmp_path / "feats" / shard_name(i, len(bounds) - 1), ids[a:b], x[a:b])
    src = open_features(tmp_path / "feats")
    np.testing.assert_array_equal(src.ids, ids)
    plan = plan_blocks(29, 1003, 12, 10, query_chunk=10, image_block=64, group=4)
    _, rows = search(q, src, 10, plan)
    np.testing.assert_array_equal(src.ids[rows.numpy()], ids[oracle_rows(q, x, 10)])


def test_world_split_of_blocks_gives_the_same_result():
    """What each rank computes, merged, equals one process (the collective is tested in tests/dist)."""
    rng = np.random.default_rng(4)
    q, x = grid_features(rng, 21, 10), grid_features(rng, 555, 10)
    src = ArraySource(np.arange(555), x)
    plan = plan_blocks(21, 555, 10, 10, query_chunk=8, image_block=40, group=4)
    whole_v, whole_r = search(q, src, 10, plan)
    from engine import dist

    parts = [search(q, src, 10, plan, blocks=dist.shard_range(plan.num_blocks(555), r, 3)) for r in range(3)]
    v, r = merge_topk(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), 10)
    assert torch.equal(r, whole_r) and torch.equal(v, whole_v)


def test_distributed_search_single_process_needs_k_images():
    x = np.eye(4, dtype=np.float32)
    plan = plan_blocks(1, 4, 4, 5)
    with pytest.raises(InputError, match="at least 5 images"):
        distributed_search(x[:1], ArraySource(np.arange(4), x), 5, plan)


def test_nan_feature_is_named():
    x = np.eye(12, dtype=np.float32)
    x[7, 3] = np.nan
    plan = plan_blocks(2, 12, 12, 3)
    with pytest.raises(InputError, match="id 107"):
        search(x[:2] * 0 + 1, ArraySource(np.arange(100, 112), x), 3, plan)


def test_plan_respects_memory_budget():
    big = plan_blocks(100_000, 1_000_000, 512, 10, max_memory_mb=2048)
    small = plan_blocks(100_000, 1_000_000, 512, 10, max_memory_mb=400)
    for plan, budget in ((big, 2048), (small, 400)):
        working = 2 * plan.query_chunk * plan.image_block * 4 + plan.image_block * 512 * 8
        assert 100_000 * 512 * 4 + working < budget * 2**20
    assert small.query_chunk * small.image_block < big.query_chunk * big.image_block
    with pytest.raises(InputError, match="max-memory-mb"):
        plan_blocks(1_000_000, 10, 512, 10, max_memory_mb=1000)


# ------------------------------------------------------------------------ feature formats ----

def test_npz_roundtrip_and_streamed_reads(tmp_path):
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float16):
        ids, x = rng.permutation(1000)[:77], gaussian(rng, 77, 9, dtype)
        path = save_features(tmp_path / f"f_{np.dtype(dtype).name}.npz", ids, x)
        with np.load(path) as z:  # a plain npz that numpy reads
            assert z["ids"].dtype == np.int64 and z["feats"].dtype == dtype
        src = open_features(path)
        np.testing.assert_array_equal(src.read(5, 60), x[5:60])
        got_ids, got = load_features(path)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got, x)


def test_compressed_npz_from_elsewhere_still_loads(tmp_path):
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    np.savez_compressed(tmp_path / "c.npz", ids=np.arange(5), feats=x)
    np.testing.assert_array_equal(open_features(tmp_path / "c.npz").read(1, 4), x[1:4])


def test_jsonl_roundtrip_and_seed_keys(tmp_path):
    rng = np.random.default_rng(6)
    x = gaussian(rng, 6, 5)
    write_feature_jsonl(tmp_path / "img.jsonl", np.arange(6) + 100, x, "image_id")
    first = json.loads((tmp_path / "img.jsonl").read_text().splitlines()[0])
    assert set(first) == {"image_id", "feature"} and first["image_id"] == 100
    ids, got = load_features(tmp_path / "img.jsonl")
    np.testing.assert_array_equal(ids, np.arange(6) + 100)
    np.testing.assert_allclose(got, x, rtol=0, atol=0)
    (tmp_path / "cc.jsonl").write_text('{"text_id": 3, "feature": [1, 0]}\n{"text_id": 4, "feature": [0, 1]}\n')
    ids, got = load_features(tmp_path / "cc.jsonl")
    assert ids.tolist() == [3, 4] and got.shape == (2, 2)


@pytest.mark.parametrize("text,match", [
    ('{"image_id": 1, "feature": [1, 2]}\n{"image_id": 2, "feature": [1]}\n', r"bad.jsonl:2: .*1 values"),
    ('{"image_id": "1", "feature": [1]}\n', r"bad.jsonl:1: id '1' is not an integer"),
    ('{"feature": [1]}\n', r"bad.jsonl:1: expected an id"),
    ('{"image_id": 1, "feature": [1]}\n{"image_id": 1, "feature": [2]}\n', r"duplicate ids \[1\]"),
])
def test_bad_jsonl_names_the_line(tmp_path, text, match):
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(InputError, match=match):
        open_features(tmp_path / "bad.jsonl")


def test_shard_folder_must_be_one_complete_set(tmp_path):
    x = np.eye(3, dtype=np.float32)
    save_features(tmp_path / "a" / shard_name(0, 2), [1, 2, 3], x)
    with pytest.raises(InputError, match=r"incomplete extraction, shards of ranks \[1\] of 2"):
        open_features(tmp_path / "a")
    save_features(tmp_path / "a" / shard_name(1, 2), [4, 5, 6], x)
    assert open_features(tmp_path / "a").ids.tolist() == [1, 2, 3, 4, 5, 6]
    save_features(tmp_path / "a" / shard_name(0, 1), [7], x[:1])
    with pytest.raises(InputError, match="different world sizes"):
        open_features(tmp_path / "a")
    save_features(tmp_path / "b" / "x.npz", [1, 2, 3], x)
    save_features(tmp_path / "b" / "y.npz", [3, 4, 5], x)
    with pytest.raises(InputError, match=r"duplicate ids \[3\]"):
        open_features(tmp_path / "b")


def test_save_features_rejects_bad_arrays(tmp_path):
    with pytest.raises(InputError, match="2 ids but 3"):
        save_features(tmp_path / "x.npz", [1, 2], np.zeros((3, 4), np.float32))
    with pytest.raises(InputError, match="float32/float16"):
        save_features(tmp_path / "x.npz", [1], np.zeros((1, 4), np.float64))
    assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------------------- atomic ----

def test_interrupted_writes_leave_no_file(tmp_path, monkeypatch):
    out = tmp_path / "pred.jsonl"
    calls = {"n": 0}
    real_dumps = json.dumps

    def failing_dumps(obj, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt  # what Ctrl-C does half-way through the file
        return real_dumps(obj, *a, **kw)

    monkeypatch.setattr(json, "dumps", failing_dumps)
    with pytest.raises(KeyboardInterrupt):
        write_predictions(out, np.arange(100), np.zeros((100, 10), np.int64))
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(np, "savez", lambda f, **kw: (f.write(b"PK partial"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        save_features(tmp_path / "f.npz", [1], np.zeros((1, 2), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_never_leaves_a_complete_looking_file(tmp_path, repo_root):
    """SIGKILL a process in the middle of writing large predictions: the target is absent (only a
    hidden temp file may remain), never a truncated pred.jsonl."""
    out = tmp_path / "pred.jsonl"
    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[2])\n"
        "from engine.scoring.predictions import write_predictions\n"
        "print('start', flush=True)\n"
        "write_predictions(sys.argv[1], np.arange(500_000), np.zeros((500_000, 10), np.int64))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(out), str(repo_root)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"start"
    deadline = time.monotonic() + 180
    while not any(p.stat().st_size > 1_000_000 for p in tmp_path.iterdir()):  # well into the write
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".pred.jsonl.") and p.name.endswith(".tmp") for p in leftovers)


def test_predictions_file_format(tmp_path):
    write_predictions(tmp_path / "p.jsonl", np.array([5, 6]), np.array([[1, 2], [3, 4]]))
    lines = [json.loads(s) for s in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert lines == [{"query_id": 5, "item_ids": [1, 2]}, {"query_id": 6, "item_ids": [3, 4]}]


def test_zip_members_are_stored_uncompressed(tmp_path):
    path = save_features(tmp_path / "f.npz", [1, 2], np.ones((2, 3), np.float32))
    with zipfile.ZipFile(path) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


# --- what a feature file holds ---------------------------------------------------------------------

def test_feature_record_round_trips_and_swapped_folders_are_refused(tmp_path, capsys):
    from engine.inference.feature_files import check_kind
    from launch.retrieve import main as retrieve_main

    rng = np.random.default_rng(0)
    x, q = grid_features(rng, 6, 4), grid_features(rng, 3, 4)
    models = {"image_model": "ViT-tiny-test", "text_model": "BERT-tiny-test"}
    for i, (a, b) in enumerate([(0, 4), (4, 6)]):
        save_features(tmp_path / "img" / shard_name(i, 2), np.arange(a, b) + 100, x[a:b], {**models, "kind": "image"})
    save_features(tmp_path / "txt" / shard_name(0, 1), [1, 2, 3], q, {**models, "kind": "text"})
    assert open_features(tmp_path / "img").meta == {**models, "kind": "image", "dim": 4, "count": 6}
    assert open_features(tmp_path / "txt").meta["kind"] == "text"

    pred = tmp_path / "pred.jsonl"
    args = ["--top-k", "2", "--output", str(pred), "--no-progress"]
    assert retrieve_main(["--image-feats", str(tmp_path / "txt"), "--text-feats", str(tmp_path / "img"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--image-feats {tmp_path / 'txt'} holds 3 text features" in err, err
    assert "swapped" in err and not pred.exists()
    assert retrieve_main(["--image-feats", str(tmp_path / "img"), "--text-feats", str(tmp_path / "txt"), *args]) == 0
    assert pred.exists() and "warning" not in capsys.readouterr().err

    # features of another model: their spaces do not match
    save_features(tmp_path / "other.npz", [1, 2, 3], q, {**models, "text_model": "RBT3-chinese", "kind": "text"})
    assert retrieve_main(["--image-feats", str(tmp_path / "img"), "--text-feats", str(tmp_path / "other.npz"),
                          *args]) == 2
    assert "come from different models" in capsys.readouterr().err
    # MUGE jsonl says what it holds through its id key
    write_feature_jsonl(tmp_path / "q.jsonl", np.array([1, 2, 3]), q, "query_id")
    with pytest.raises(InputError, match="holds 3 text features, not image features"):
        check_kind(open_features(tmp_path / "q.jsonl").meta, "image", "--image-feats q.jsonl")
    # files without a record (written before records existed) are read, with a warning
    save_features(tmp_path / "old_img.npz", np.arange(6), x)
    save_features(tmp_path / "old_txt.npz", [1, 2, 3], q)
    assert open_features(tmp_path / "old_img.npz").meta is None
    assert retrieve_main(["--image-feats", str(tmp_path / "old_img.npz"), "--text-feats",
                          str(tmp_path / "old_txt.npz"), *args]) == 0
    assert "no record of what these features are" in capsys.readouterr().err
    # a set mixing shards of two extractions is refused
    save_features(tmp_path / "img" / shard_name(1, 2), [104, 105], x[4:], {**models, "kind": "text"})
    with pytest.raises(InputError, match="differs from"):
        open_features(tmp_path / "img")
    # a record that does not match the arrays beside it
    np.savez(tmp_path / "liar.npz", ids=np.arange(1), feats=x[:1],
             meta=np.frombuffer(json.dumps({"kind": "image", "dim": 4, "count": 9}).encode(), np.uint8))
    with pytest.raises(InputError, match="its record says 9 x 4"):
        open_features(tmp_path / "liar.npz")


@pytest.mark.parametrize("n_q,query_chunk", [(5000, None), (20000, None), (100000, None), (1500, None),
                                             (300, None), (5000, 64), (13, None)])
def test_cpu_tiles_split_queries_evenly(n_q, query_chunk):
    """CPU tile queries: never above 1,280 or an explicit --query-chunk; with enough queries the
    chunks come in a multiple of 4 (1, 2 or 4 lanes get equal shares) and are all but equal."""
    plan = plan_blocks(n_q, 30000, 512, 10, query_chunk=query_chunk)
    tq = plan.tile_queries
    chunks = -(-n_q // tq)
    assert 1 <= tq <= min(1280, query_chunk or 1280, n_q)
    if n_q >= 1024:
        assert chunks % 4 == 0
        assert n_q - (chunks - 1) * tq >= tq - chunks  # the last chunk is nearly full


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, "inf and -inf"])
def test_non_finite_features_are_named_and_huge_finite_ones_pass(bad):
    """The row-sum fast path of the finite check: +inf and -inf in one row sum to NaN, a NaN or
    inf alone stays; a finite row whose sum overflows is not an error."""
    from engine.retrieval.search import _check_finite

    x = np.ones((6, 4), np.float32)
    x[2] = np.finfo(np.float32).max  # finite, sums to inf
    _check_finite(x, "image", 0, None)
    if bad == "inf and -inf":
        x[4, 0], x[4, 1] = np.inf, -np.inf
    else:
        x[4, 3] = bad
    with pytest.raises(InputError, match="image row 14 has a NaN"):
        _check_finite(x, "image", 10, None)
