"""Exact resume: a 2-rank run SIGKILLed in the middle of a checkpoint save and resumed with
`--resume latest` ends with weights bit-identical to an uninterrupted run (fp32, exact k=2
accumulation, mid-epoch). The uninterrupted run's TensorBoard file, run dir and checkpoints are
checked on the way."""
import json
import math
import signal

import torch

from engine.run.log import read_scalars
from models.weights.model_file import read_model_file
from tests.dist.workers.engine_common import make_data, train_argv, write_ds
from tests.ranks import assert_all_ok, run_ranks

LR, WARMUP = 2e-3, 2
# 96 pairs / 2 ranks = 48 per rank; micro 4 x accumulation 2 = 8 per step -> 6 steps per epoch
STEPS_PER_EPOCH, EPOCHS, MAX_STEPS = 6, 3, 8


def expected_lr(step):
    """Warmup then cosine over EPOCHS * STEPS_PER_EPOCH steps, written out independently."""
    s, total = step - 1, EPOCHS * STEPS_PER_EPOCH
    if s < WARMUP:
        return LR * (s + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (total - WARMUP)))


def test_killed_during_save_then_resumed_is_bit_identical(tmp_path):
    data = make_data(tmp_path / "data")
    ds = write_ds(tmp_path / "ds.json", stage=0, micro=4, gas=2)
    flags = ["--epochs", str(EPOCHS), "--max-steps", str(MAX_STEPS), "--save-every-steps", "3",
             "--keep-last", "2", "--export", "--lr", str(LR), "--warmup", str(WARMUP), "--val-every-steps", "4"]
    logs = tmp_path / "runs"

    assert_all_ok(run_ranks(train_argv(data, ds, logs, "a", flags, val=True), timeout=600))
    # B: SIGKILLed (both ranks) inside the save of step 6, after DeepSpeed wrote its files
    killed = run_ranks(train_argv(data, ds, logs, "b", flags, val=True), timeout=600,
                       env={"CLIP_TEST_DIE_IN_SAVE": "6"})
    assert [r.returncode for r in killed] == [-signal.SIGKILL] * 2, [r.output[-2000:] for r in killed]
    ckpt_b = logs / "b" / "checkpoints"
    assert (ckpt_b / "latest").read_text().strip() == "step_00000003"  # the half-saved step 6 is not named
    assert (ckpt_b / "step_00000006").is_dir() and not (ckpt_b / "step_00000006" / "meta.json").exists()
    resumed = run_ranks(train_argv(data, ds, logs, "b", flags + ["--resume", "latest"], val=True), timeout=600)
    assert_all_ok(resumed)
    assert "resumed from" in resumed[0].output and "step 3, epoch 0, 3 steps into it" in resumed[0].output

    a = read_model_file(logs / "a" / "model_fp32.pt")[0]
    b = read_model_file(logs / "b" / "model_fp32.pt")[0]
    assert a.keys() == b.keys() and all(v.dtype == torch.float32 for v in a.values() if v.is_floating_point())
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    from models import build_clip
    torch.manual_seed(123)  # the run's seed: the initial weights; training must have moved them
    init = build_clip("ViT-tiny-test", "BERT-tiny-test", vocab_size=len(a["bert.embeddings.word_embeddings.weight"]))
    assert not torch.equal(init.state_dict()["text_projection"], a["text_projection"])

    # keep-last 2: saves at 3, 6 and the final 8 leave 6 and 8
    ckpt_a = logs / "a" / "checkpoints"
    assert sorted(p.name for p in ckpt_a.iterdir() if p.is_dir()) == ["step_00000006", "step_00000008"]
    assert (ckpt_a / "latest").read_text().strip() == "step_00000008"
    assert sorted(p.name for p in ckpt_b.iterdir() if p.is_dir()) == ["step_00000006", "step_00000008"]

    # the run dir: resolved config, log, TensorBoard scalars
    cfg = json.loads((logs / "a" / "config.json").read_text())
    assert cfg["resolved"]["global_batch"] == 16 and cfg["resolved"]["steps_per_epoch"] == STEPS_PER_EPOCH
    assert cfg["ds"]["zero_stage"] == 0 and cfg["lr"] == LR
    log_text = (logs / "a" / "train.log").read_text()
    scalars = read_scalars(logs / "a" / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/logit_scale", "train/grad_norm", "train/samples_per_s",
                "train/step_time_s"):
        assert [s for s, _ in scalars[tag]] == list(range(1, MAX_STEPS + 1)), tag
    for step, lr in scalars["train/lr"]:
        assert math.isclose(lr, expected_lr(step), rel_tol=1e-5), (step, lr, expected_lr(step))
    for step, loss in scalars["train/loss"]:  # the same numbers as the log lines
        assert f"step {step}/{MAX_STEPS} epoch {(step - 1) // STEPS_PER_EPOCH} loss {loss:.4f}" in log_text
        assert 0 < loss < 2 * math.log(16)
    assert all(v > 0 for _, v in scalars["train/samples_per_s"])
    assert [s for s, _ in scalars["val/mean_recall"]] == [4, 8]  # --val-every-steps 4
    for tag in ("val/t2i_mean_recall", "val/i2t_r1", "val/i2t_mean_recall", "val/mean_recall_both"):
        assert [s for s, _ in scalars[tag]] == [4, 8], tag  # both directions, same steps
    assert scalars["val/t2i_mean_recall"] == scalars["val/mean_recall"]
    assert "image->text mean recall" in log_text
    for _, v in scalars["val/mean_recall"]:
        assert 0 <= v <= 100
    assert "loss_scale" not in " ".join(scalars)  # fp32: no fp16 loss scale to report


# --- the checkpoint bookkeeping on its own (no processes) ----------------------------------------

def _tag(base, step, complete=True, run_id=None):
    from engine.run.checkpoint import META, tag_for
    d = base / tag_for(step)
    d.mkdir(parents=True)
    if complete:
        (d / META).write_text(json.dumps({"step": step, "client_state": {"run_id": run_id} if run_id else {}}))
    return d


def test_resolve_accepts_only_complete_checkpoints(tmp_path):
    import pytest

    from data.files import InputError
    from engine.run.checkpoint import resolve

    ck = tmp_path / "run" / "checkpoints"
    done, half = _tag(ck, 4), _tag(ck, 8, complete=False)
    (ck / "latest").write_text("step_00000004\n")
    assert resolve("latest", ck) == (ck, "step_00000004")
    assert resolve(str(ck), ck) == (ck, "step_00000004")
    assert resolve(str(tmp_path / "run"), ck) == (ck, "step_00000004")  # a run dir
    assert resolve(str(done), tmp_path / "elsewhere") == (ck, "step_00000004")  # a tag dir
    with pytest.raises(InputError, match="incomplete checkpoint"):
        resolve(str(half), ck)
    (ck / "latest").write_text("step_00000008\n")
    with pytest.raises(InputError, match="incomplete"):
        resolve("latest", ck)
    with pytest.raises(InputError, match="not found"):
        resolve("latest", tmp_path / "empty")


def test_prune_deletes_only_this_runs_older_complete_tags(tmp_path):
    from engine.run.checkpoint import prune

    for s in (2, 3, 4):
        _tag(tmp_path, s, run_id="mine")
    _tag(tmp_path, 0)  # written before run ids existed: nobody's to delete
    _tag(tmp_path, 1, run_id="theirs")  # another run's
    _tag(tmp_path, 5, complete=False)  # half-written: a crashed save's debris, not pruned
    _tag(tmp_path, 7, run_id="mine")  # this run's old future (a branch resumed from an earlier step)
    (tmp_path / "unrelated").mkdir()
    prune(tmp_path, keep_last=2, newest=4, run_id="mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000000", "step_00000001", "step_00000003", "step_00000004", "step_00000005", "step_00000007",
        "unrelated"]
    prune(tmp_path, keep_last=1, newest=4, run_id=None)  # no run id: nothing is known to be ours
    assert (tmp_path / "step_00000003").is_dir()


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    from engine.run.checkpoint import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expect = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])
