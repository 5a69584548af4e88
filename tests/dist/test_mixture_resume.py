"""A weighted mixture of two built data sets on 2 gloo ranks: a run killed mid-epoch (SIGKILL on both
ranks after the step-3 checkpoint) and resumed with --resume latest sees the same sample sequence as
an uninterrupted run: the same per-source shares at every step, and bit-identical final weights.
A resume with other mixture weights is refused."""
import signal

import torch

from engine.run.log import read_scalars
from launch import build_dataset
from models.weights.model_file import read_model_file
from tests.dist.workers.engine_common import make_data, train_argv, write_ds
from tests.ranks import assert_all_ok, run_ranks


def _mixture_argv(data, built, ds, logs, name, weights, extra):
    argv = train_argv(data, ds, logs, name, extra)
    at = argv.index("--train-data")
    del argv[at:at + 4]  # --train-data FILE --train-img LMDB
    return argv + ["--train-data", str(built[0]), "--train-data", str(built[1]), "--train-data-weights", weights]


def test_mixture_killed_mid_epoch_and_resumed_sees_the_same_samples(tmp_path):
    data = make_data(tmp_path / "data")
    built = [tmp_path / "one_shard", tmp_path / "three_shards"]  # the same pairs in two orders
    for out, n in zip(built, (1, 3)):
        assert build_dataset.main(["--queries", data["train_data"], "--images", data["train_img"], "--output", str(out),
                                   "--vocab", data["vocab"], "--resolution", "32", "--num-shards", str(n),
                                   "--workers", "1", "--no-progress"]) == 0
    ds = write_ds(tmp_path / "ds.json", stage=0, micro=4, gas=2)
    # 192 samples per epoch / 2 ranks / 8 per step = 12 steps per epoch: step 3 and 7 are mid-epoch
    flags = ["--epochs", "2", "--max-steps", "7", "--save-every-steps", "3", "--export"]
    logs = tmp_path / "runs"
    assert_all_ok(run_ranks(_mixture_argv(data, built, ds, logs, "a", "1,3", flags), timeout=600))
    killed = run_ranks(_mixture_argv(data, built, ds, logs, "b", "1,3", flags), timeout=600,
                       env={"CLIP_TEST_DIE_AT_STEP": "4"})
    assert [r.returncode for r in killed] == [-signal.SIGKILL] * 2, [r.output[-2000:] for r in killed]
    refused = run_ranks(_mixture_argv(data, built, ds, logs, "b", "1,2", flags + ["--resume", "latest"]), timeout=600)
    assert all(r.returncode == 2 for r in refused) and "saved with the mixture" in refused[0].output
    resumed = run_ranks(_mixture_argv(data, built, ds, logs, "b", "1,3", flags + ["--resume", "latest"]), timeout=600)
    assert_all_ok(resumed)
    assert "step 3, epoch 0, 3 steps into it" in resumed[0].output

    a, b = (read_scalars(logs / run / "tensorboard") for run in ("a", "b"))
    for tag in ("data/share/0_one_shard", "data/share/1_three_shards"):
        assert [s for s, _ in a[tag]] == list(range(1, 8)) and a[tag] == b[tag], tag
    shares = [v for _, v in a["data/share/1_three_shards"]]
    assert 0.5 < sum(shares) / len(shares) < 0.95  # weight 3 of 4, over 7 steps of 16 samples
    wa, wb = (read_model_file(logs / run / "model_fp32.pt")[0] for run in ("a", "b"))
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different
