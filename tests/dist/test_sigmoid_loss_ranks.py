"""The chunked sigmoid loss on 2 and 4 gloo ranks (ring and gather exchange, whole blocks and small
chunks, local and global loss) against open_clip 3.3's SigLipLoss in each of its distribution modes,
and against one process on the whole batch. See the worker for what each number is."""
import json

import pytest

from tests.oracles import open_clip_loss
from tests.ranks import REPO, assert_all_ok, run_ranks

TOL = 1e-5


@pytest.mark.parametrize("world", [2, 4])
def test_sigmoid_loss_equals_open_clip_on_ranks(tmp_path, world):
    open_clip_loss()
    results = run_ranks([str(REPO / "tests/dist/workers/sigmoid_loss_ranks.py"), str(tmp_path)],
                        world_size=world, timeout=300)
    assert_all_ok(results)
    for r in range(world):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["world"] == world
        assert res["oracle_modes_agree"] < TOL and res["grad_norm_texts"] > 0.1, res
        for how in ("ring", "gather"):
            for chunk in ("block", 4):
                key = f"{how}_chunk{chunk}"
                for mode in ("bidir", "shift", "reduce", "gather"):
                    assert res[key][mode] < TOL, (r, key, mode, res[key])
                assert res[key]["vs_one_process"] < TOL, (r, key, res[key])
                glob = res[key + "_global"]
                assert glob["loss_vs_one_process"] < TOL and glob["grads_vs_local"] < TOL, (r, key, glob)
