"""The gathered contrastive loss through real DeepSpeed engines on 2 gloo ranks gives exactly the
gradient of one process on the concatenated batch (local and global loss, and exact k=2
accumulation); plain accumulation does not. One launch checks all of them (see the worker)."""
import json

from tests.dist.workers.engine_common import REPO, make_data
from tests.ranks import assert_all_ok, run_ranks

TOL = 1e-5  # fp32, summation order differs between the oracle and the engine


def test_gathered_loss_and_exact_accumulation_match_single_process(tmp_path):
    make_data(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    results = run_ranks([str(REPO / "tests/dist/workers/engine_loss.py"), str(tmp_path / "data"), str(out)],
                        world_size=2, timeout=540)
    assert_all_ok(results)
    for r in range(2):
        res = json.loads((out / f"rank{r}.json").read_text())
        for mode in ("local", "global", "local_exact_k2", "global_exact_k2"):
            assert res[mode]["grad_rel_err"] < TOL, (r, mode, res[mode])
            assert abs(res[mode]["loss"] - res["loss_ref"]) < 1e-5, (r, mode, res[mode], res["loss_ref"])
        # plain accumulation scores each micro-batch against its own negatives only: a different
        # gradient (and loss), which is why it is not the default
        assert res["local_plain_k2"]["grad_rel_err"] > 1e-3, res["local_plain_k2"]
        assert res["dropout_active"]
        assert res["dropout_replay_equal"]
