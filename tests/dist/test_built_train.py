"""train.py on 2 gloo ranks from a built data set (launch/build_dataset.py) against the seed's
jsonl + LMDB path on the same data: with one shard the built set holds the pairs in file order, so the
same seed, sampler and batches must give bit-identical weights."""
import torch

from launch import build_dataset
from models.weights.model_file import read_model_file
from tests.dist.workers.engine_common import make_data, train_argv, write_ds
from tests.ranks import assert_all_ok, run_ranks


def test_two_ranks_train_from_a_built_data_set_as_from_jsonl_and_lmdb(tmp_path):
    data = make_data(tmp_path / "data")
    built = tmp_path / "built"
    assert build_dataset.main(["--queries", data["train_data"], "--images", data["train_img"], "--output",
                               str(built), "--vocab", data["vocab"], "--resolution", "32", "--num-shards", "1",
                               "--workers", "1", "--no-progress"]) == 0
    ds = write_ds(tmp_path / "ds.json", stage=0, micro=4, gas=2)
    flags = ["--epochs", "2", "--max-steps", "7", "--export"]
    logs = tmp_path / "runs"
    assert_all_ok(run_ranks(train_argv(data, ds, logs, "lmdb", flags), timeout=600))
    argv = train_argv(data, ds, logs, "built", flags)
    at = argv.index("--train-img")
    argv = argv[:at] + argv[at + 2:]
    argv[argv.index("--train-data") + 1] = str(built)
    results = run_ranks(argv, timeout=600)
    assert_all_ok(results)
    assert "built data set" in results[0].output and "done at step 7" in results[0].output
    (a, rec_a), (b, rec_b) = (read_model_file(logs / run / "model_fp32.pt") for run in ("lmdb", "built"))
    assert rec_a["image"] == rec_b["image"]  # the same preprocessing recorded from the store and the data set
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
