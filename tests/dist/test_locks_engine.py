"""Locked towers through DeepSpeed ZeRO 1 and 2 on 2 gloo ranks: after three steps every frozen
parameter is bit-identical, every trainable one moved, and the optimizer's state (Adam and the fp32
master partition, summed over ranks) covers the trainable parameters only (ZeRO partitions only what
trains). The trainer's own lock flags are exercised in tests/dist/test_recipes_train.py."""
import json

from tests.dist.workers.engine_common import REPO, make_data
from tests.ranks import assert_all_ok, run_ranks


def test_locked_towers_stay_bit_identical_and_hold_no_optimizer_state(tmp_path):
    make_data(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    results = run_ranks([str(REPO / "tests/dist/workers/engine_locks.py"), str(tmp_path / "data"), str(out)],
                        world_size=2, timeout=540)
    assert_all_ok(results)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for stage in ("zero1", "zero2"):
        res = ranks[0][stage]
        assert res["frozen_identical"] and ranks[1][stage]["frozen_identical"], stage
        assert res["frozen_count"] > 10 and sorted(res["trainable_moved"]) == res["trainable"], res
        # the image tower's last block, ln_post and proj, text_projection, logit scale and bias
        assert {n.split(".")[0] for n in res["trainable"]} == {"visual", "text_projection", "logit_scale",
                                                                "logit_bias"}
        trainable, everything = res["trainable_elements"], res["all_elements"]
        assert trainable < everything / 2
        for kind in ("adam_elements", "master_elements"):
            total = sum(r[stage][kind] for r in ranks)  # each rank holds its partition
            assert trainable <= total <= trainable + 64 * 2 * 20, (stage, kind, total, trainable)  # alignment padding
            assert all(r[stage][kind] < trainable for r in ranks), (stage, kind)  # partitioned, not replicated
