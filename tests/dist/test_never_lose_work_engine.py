"""Never lose work, with real train.py processes: a rerun under the same --name is refused without
touching the run; TensorBoard points up to a committed checkpoint survive a SIGKILL; a resumed run
prunes only its own checkpoints; --overwrite moves the old run aside; and a start that fails (bad
resolution, bad vocab, too few pairs, a truncated store) leaves no run dir behind."""
import json
import os
import shutil
import signal
import subprocess
import sys

from engine.run.log import read_events, read_scalars
from tests.dist.workers.engine_common import make_data, train_argv, write_ds
from tests.ranks import REPO, assert_all_ok, base_env, run_ranks

FLAGS = ["--epochs", "3", "--max-steps", "6", "--save-every-steps", "2", "--save-frequency", "0", "--keep-last", "1"]


def _snapshot(run):
    return {str(p.relative_to(run)): p.stat().st_size for p in run.rglob("*") if p.is_file()}


def _foreign_tags(ckpt):
    """Tags this run did not write: another run's complete step 5, a half-written step 9 and a
    step 1 from before run ids existed."""
    for step, meta in ((5, {"step": 5, "client_state": {"run_id": "another-run"}}), (9, None), (1, {"step": 1})):
        d = ckpt / f"step_{step:08d}"
        d.mkdir()
        (d / "mp_rank_00_model_states.pt").write_bytes(b"someone's work")
        if meta:
            (d / "meta.json").write_text(json.dumps(meta))


def test_rerun_refused_points_survive_a_kill_and_only_own_checkpoints_are_pruned(tmp_path):
    data = make_data(tmp_path / "data")
    ds = write_ds(tmp_path / "ds.json", stage=1, micro=4)
    logs = tmp_path / "runs"
    run, ckpt = logs / "r", logs / "r" / "checkpoints"

    # SIGKILLed (both ranks) right after the checkpoint of step 4 committed
    killed = run_ranks(train_argv(data, ds, logs, "r", FLAGS), env={"CLIP_TEST_DIE_AT_STEP": "4"})
    assert [r.returncode for r in killed] == [-signal.SIGKILL] * 2, [r.output[-2000:] for r in killed]
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    points = read_scalars(run / "tensorboard")
    assert [s for s, _ in points["train/loss"]] == [1, 2, 3, 4]  # every point before the checkpoint

    # the same command again, without --resume: refused on every rank, nothing touched
    before = _snapshot(run)
    again = run_ranks(train_argv(data, ds, logs, "r", FLAGS), timeout=600)
    for r in again:
        assert r.returncode == 2, r.output[-2000:]
        assert (f"train.py: error: {run} already holds a run (checkpoints (latest step_00000004), config.json, "
                f"tensorboard/, train.log); continue it with --resume latest, or start afresh with --overwrite") \
            in r.output, r.output[-2000:]
    assert _snapshot(run) == before

    # resumed with tags it did not write in its checkpoints dir: keep-last 1 prunes only its own
    _foreign_tags(ckpt)
    assert_all_ok(run_ranks(train_argv(data, ds, logs, "r", FLAGS + ["--resume", "latest"]), timeout=600))
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [
        "step_00000001", "step_00000005", "step_00000006", "step_00000009"]  # step_00000004 was its own
    assert (ckpt / "step_00000005" / "mp_rank_00_model_states.pt").read_bytes() == b"someone's work"
    assert [s for s, _ in read_scalars(run / "tensorboard")["train/loss"]] == [1, 2, 3, 4, 5, 6]
    # the resume told TensorBoard it continues at step 5: points of step >= 5 written before the kill
    # (had there been any) are dropped, not shown beside the new ones (tests/unit/test_tensorboard_log.py)
    restarts = [e.step for e in read_events(run / "tensorboard") if e.HasField("session_log")]
    assert restarts == [5], restarts

    # --overwrite: a fresh run in r; the old one, every file of it, in r.old-<time>
    before = _snapshot(run)
    assert_all_ok(run_ranks(train_argv(data, ds, logs, "r", ["--max-steps", "1", "--save-frequency", "0",
                                                             "--overwrite"]), world_size=1, timeout=600))
    old = [p for p in logs.iterdir() if p.name.startswith("r.old-")]
    assert len(old) == 1 and _snapshot(old[0]) == before
    assert json.loads((run / "config.json").read_text())["resolved"]["end_step"] == 1
    assert not (run / "checkpoints").exists()


def _start(argv, env):
    return subprocess.Popen([sys.executable, *argv], env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_failed_start_leaves_no_run_dir(tmp_path):
    data = make_data(tmp_path / "data")
    logs = tmp_path / "runs"
    ds = write_ds(tmp_path / "ds.json", micro=4)
    (tmp_path / "bad_vocab.txt").write_text("[PAD]\n[UNK]\n" + "".join(f"w{i}\n" for i in range(20)))
    truncated = tmp_path / "truncated"
    shutil.copytree(data["train_img"], truncated)
    os.truncate(truncated / "data.mdb", (truncated / "data.mdb").stat().st_size // 2)
    # an existing run that an --overwrite whose start fails must leave where it is
    (logs / "kept" / "checkpoints").mkdir(parents=True)
    (logs / "kept" / "config.json").write_text("{}")

    cases = {  # name: (extra flags, what the one error line says)
        "resolution": (["--model", "ViT-B-16"], [f"--train-img {data['train_img']} holds 32 px images but "
                                                  f"--model ViT-B-16 expects 224 px"]),
        "vocab": (["--vocab", str(tmp_path / "bad_vocab.txt")], ["bad_vocab.txt: lacks the special token"]),
        "pairs": (["--deepspeed_config", write_ds(tmp_path / "big.json", micro=128)],
                  ["96 pairs are fewer than one global batch"]),
        "store": (["--train-img", str(truncated)],
                  [f"{truncated / 'data.mdb'}: truncated store", f"launch/build_lmdb.py --input <the same images> "
                                                                  f"--output {truncated}"]),
        "kept": (["--model", "ViT-B-16", "--overwrite"], ["expects 224 px"]),
    }
    procs = {}
    for name, (flags, _) in cases.items():  # one plain process each, started together (mostly imports)
        procs[name] = _start(train_argv(data, ds, logs, name, flags), base_env())
    try:
        outs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for name, (_, messages) in cases.items():
        out = outs[name]
        assert procs[name].returncode == 2, (name, out[-3000:])  # not 135 (SIGBUS) nor a traceback
        errors = [ln for ln in out.splitlines() if ln.startswith("train.py: error:")]
        assert len(errors) == 1 and all(m in errors[0] for m in messages), (name, out[-3000:])
        assert "Traceback" not in out, (name, out[-3000:])
    assert sorted(p.name for p in logs.iterdir()) == ["kept"]  # no run dir from any failed start
    assert sorted(p.name for p in (logs / "kept").iterdir()) == ["checkpoints", "config.json"]
