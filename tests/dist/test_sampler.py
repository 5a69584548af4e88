"""Across 2 real rank processes the sampler covers each sample once per epoch, and a mid-epoch
restart yields the same remaining order."""
import json

from tests.ranks import assert_all_ok, run_ranks


def test_two_ranks_cover_once_and_restart_mid_epoch(tmp_path, repo_root):
    n, seed, epoch, start, batch = 1001, 5, 3, 120, 16
    results = run_ranks([str(repo_root / "tests/dist/workers/sampler_worker.py"), str(tmp_path), str(n),
                         str(seed), str(epoch), str(start), str(batch)], world_size=2, timeout=360)
    assert_all_ok(results)
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    full = [o["full"] for o in out]
    union = full[0] + full[1]
    assert len(full[0]) == len(full[1]) == n // 2
    assert len(set(union)) == len(union)  # no sample twice
    assert set(union) <= set(range(n)) and n - len(union) == 1  # only the ragged tail (< world) is left out
    assert full[0] != sorted(full[0])  # actually shuffled
    for o in out:
        assert o["rest"] == o["full"][start:]
