"""Across 2 and 3 real rank processes the sampler covers each sample once per epoch (global and
shard-local), and a mid-epoch restart yields the same remaining order. The oracle is one process
reading the whole epoch as a single rank: rank r's share is its positions r, r+W, ... (global)."""
import json

import pytest

from data.sampler import ShardedSampler
from tests.ranks import assert_all_ok, run_ranks

SIZES = [100, 250, 1, 0, 300, 150, 200]  # 1001 pairs in uneven shards


def _run(tmp_path, repo_root, world, n, seed, epoch, start, batch, extra=()):
    results = run_ranks([str(repo_root / "tests/dist/workers/sampler_worker.py"), str(tmp_path), str(n),
                         str(seed), str(epoch), str(start), str(batch), *extra], world_size=world, timeout=360)
    assert_all_ok(results)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_cover_once_and_restart_mid_epoch(tmp_path, repo_root, world):
    n, seed, epoch, start, batch = 1001, 5, 3, 120, 16
    out = _run(tmp_path, repo_root, world, n, seed, epoch, start, batch)
    full = [o["full"] for o in out]
    union = [i for f in full for i in f]
    assert {len(f) for f in full} == {n // world}
    assert len(set(union)) == len(union)  # no sample twice
    assert set(union) <= set(range(n)) and n - len(union) == n % world  # only the ragged tail is left out
    assert full[0] != sorted(full[0])  # actually shuffled
    single = ShardedSampler(n, 0, 1, seed=seed)
    single.set_epoch(epoch)
    order = list(single)
    for r, f in enumerate(full):
        assert f == order[r::world][: n // world]
    for o in out:
        assert o["rest"] == o["full"][start:]


def test_shard_local_on_three_ranks(tmp_path, repo_root):
    n, seed, epoch, start, batch = sum(SIZES), 2, 1, 77, 8
    out = _run(tmp_path, repo_root, 3, n, seed, epoch, start, batch, [",".join(map(str, SIZES))])
    full = [o["full"] for o in out]
    union = [i for f in full for i in f]
    assert {len(f) for f in full} == {n // 3}
    assert len(set(union)) == len(union) and set(union) <= set(range(n)) and n - len(union) == n % 3
    for o in out:
        assert o["rest"] == o["full"][start:]
