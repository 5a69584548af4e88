"""launch/retrieve.py on 2 real gloo ranks equals 1 process and the full-sort oracle, byte for byte,
for fp32 and fp16 shards whose sizes do not divide the image count; a bad block on one rank
fails every rank instead of hanging them."""
import json
import subprocess
import sys

import numpy as np
import pytest

from engine.inference.feature_files import save_features, shard_name
from launch.retrieve import main as retrieve_main
from tests.ranks import assert_all_ok, base_env, free_port, run_ranks


def grid(rng, n, d, dtype):
    # Multiples of 1/8: exact dot products in any summation order, and many exact ties.
    return (rng.integers(-3, 4, (n, d)) / 8).astype(dtype)


def oracle(q, x, k):
    s = q.astype(np.float64) @ x.astype(np.float64).T
    return np.stack([np.lexsort((np.arange(len(x)), -row))[:k] for row in s])


def make_inputs(tmp_path, dtype, n_q=41, n_img=1001, dim=20):
    rng = np.random.default_rng(7)
    q, x = grid(rng, n_q, dim, dtype), grid(rng, n_img, dim, dtype)
    img_ids = rng.permutation(10 * n_img)[:n_img]
    q_ids = np.arange(n_q) + 500
    bounds = [0, 333, 334, 700, n_img]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        save_features(tmp_path / "img" / shard_name(i, 4), img_ids[a:b], x[a:b])
    save_features(tmp_path / "txt.npz", q_ids, q)
    return q, x, img_ids, q_ids


def run_two(repo_root, args, launcher):
    script = str(repo_root / "launch/retrieve.py")
    if launcher == "ranks":  # the environment a launcher sets, without the launcher
        assert_all_ok(run_ranks([script, *args], world_size=2, timeout=360))
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), script, *args]
    proc = subprocess.run(cmd, env=base_env(), cwd=repo_root, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on 2 rank(s)" in proc.stdout


@pytest.mark.parametrize("dtype,launcher", [(np.float32, "ranks"), (np.float16, "torchrun")])
def test_two_ranks_equal_one_and_the_oracle(tmp_path, repo_root, dtype, launcher):
    q, x, img_ids, q_ids = make_inputs(tmp_path, dtype)
    args = ["--image-feats", str(tmp_path / "img"), "--text-feats", str(tmp_path / "txt.npz"),
            "--top-k", "10", "--image-block", "64", "--query-chunk", "16", "--no-progress"]
    run_two(repo_root, [*args, "--output", str(tmp_path / "two.jsonl")], launcher)
    assert retrieve_main([*args, "--output", str(tmp_path / "one.jsonl")]) == 0
    two = (tmp_path / "two.jsonl").read_bytes()
    assert two == (tmp_path / "one.jsonl").read_bytes()
    lines = [json.loads(s) for s in two.decode().splitlines()]
    assert [p["query_id"] for p in lines] == q_ids.tolist()
    want = img_ids[oracle(q, x, 10)]
    assert [p["item_ids"] for p in lines] == want.tolist()


def test_nan_on_one_rank_fails_both(tmp_path, repo_root):
    rng = np.random.default_rng(8)
    x = grid(rng, 200, 8, np.float32)
    x[190, 2] = np.nan  # in the last block: only rank 1 reads it
    save_features(tmp_path / "img.npz", np.arange(200), x)
    save_features(tmp_path / "txt.npz", np.arange(3), x[:3])
    results = run_ranks([str(repo_root / "launch/retrieve.py"), "--image-feats", str(tmp_path / "img.npz"),
                         "--text-feats", str(tmp_path / "txt.npz"), "--image-block", "64", "--output",
                         str(tmp_path / "p.jsonl"), "--no-progress"], world_size=2, timeout=360)
    assert [r.returncode for r in results] == [2, 2], [r.output for r in results]
    assert all("image id 190 has a NaN" in r.output for r in results)
    assert not (tmp_path / "p.jsonl").exists()
