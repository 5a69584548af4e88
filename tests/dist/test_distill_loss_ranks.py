"""Distillation's loss on 2 gloo ranks (features gathered with gradient, local and global) equals
open_clip 3.3's DistillClipLoss with gather_with_grad: both terms within 1e-6, the gradients within 1e-5."""
import json

from tests.oracles import open_clip_loss
from tests.ranks import REPO, assert_all_ok, run_ranks


def test_distill_loss_equals_open_clip_on_two_ranks(tmp_path):
    open_clip_loss()
    results = run_ranks([str(REPO / "tests/dist/workers/distill_loss_ranks.py"), str(tmp_path)],
                        world_size=2, timeout=300)
    assert_all_ok(results)
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        for mode in ("local", "global"):
            got = res[mode]
            assert got["distill_value"] > 0.1, got
            assert got["contrastive"] < 1e-6 and got["distill"] < 1e-6, (r, mode, got)
            assert got["grads"] < 1e-5, (r, mode, got)  # sums over ranks in another order
