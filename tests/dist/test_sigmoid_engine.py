"""The sigmoid loss through real DeepSpeed engines on 2 gloo ranks: one micro-batch per rank and
GradCache accumulation 2 (ring and gather exchange, local and global loss, chunks) give the gradient
of one process on the whole doubled batch, the logit bias's included; plain accumulation does not."""
import json

from tests.dist.workers.engine_common import REPO, make_data
from tests.ranks import assert_all_ok, run_ranks

TOL = 1e-5


def test_sigmoid_loss_exact_accumulation_matches_one_process(tmp_path):
    make_data(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    results = run_ranks([str(REPO / "tests/dist/workers/engine_sigmoid.py"), str(tmp_path / "data"), str(out)],
                        world_size=2, timeout=540)
    assert_all_ok(results)
    for r in range(2):
        res = json.loads((out / f"rank{r}.json").read_text())
        assert abs(res["bias_grad_ref"]) > 1e-3, res  # the bias has a gradient to compare
        for mode in ("ring_k1", "ring_exact_k2", "gather_exact_k2", "ring_global_exact_k2"):
            assert res[mode]["grad_rel_err"] < TOL, (r, mode, res[mode])
            assert abs(res[mode]["loss"] - res["loss_ref"]) < 1e-5, (r, mode, res[mode], res["loss_ref"])
            assert abs(res[mode]["bias_grad"] - res["bias_grad_ref"]) < 1e-5, (r, mode, res[mode])
        assert res["ring_plain_k2"]["grad_rel_err"] > 1e-3, res["ring_plain_k2"]
