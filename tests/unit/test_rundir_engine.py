"""Never lose work, without processes: who may write into a run dir, --overwrite moving the old run
aside, a disk-full checkpoint save (ENOSPC simulated) and the log held until the run dir exists."""
import errno
import json
import logging

import pytest

from data.files import InputError
from engine.run import checkpoint
from engine.run import rundir


def _a_run(run_dir):
    (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000004\n")
    (run_dir / "config.json").write_text("{}")
    (run_dir / "tensorboard").mkdir()
    return run_dir


def test_a_run_dir_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    assert rundir.verdict(tmp_path / "new", None, False) is None
    (tmp_path / "empty").mkdir()
    assert rundir.verdict(tmp_path / "empty", None, False) is None
    run = _a_run(tmp_path / "r")
    msg = rundir.verdict(run, None, False)
    assert msg and "\n" not in msg
    assert f"{run} already holds a run (checkpoints (latest step_00000004), config.json, tensorboard/)" in msg
    assert "--resume latest" in msg and "--overwrite (moves it to r.old-<time>)" in msg
    assert rundir.verdict(run, "latest", False) is None
    assert rundir.verdict(run, str(run / "checkpoints" / "step_00000004"), False) is None
    assert rundir.verdict(run, None, True) is None
    other = _a_run(tmp_path / "other")
    assert "would mix two runs" in rundir.verdict(run, str(other / "checkpoints"), False)
    assert rundir.verdict(tmp_path / "new", str(other / "checkpoints"), False) is None  # seeds a new run dir
    with pytest.raises(InputError, match="already holds a run"):
        rundir.claim(run, None, False)  # one process: rank 0's verdict is its own


def test_overwrite_moves_the_old_run_aside_and_keeps_every_file(tmp_path):
    run = _a_run(tmp_path / "r")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    tb = rundir.create(run, overwrite=True)
    tb.close()
    old = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert len(old) == 1 and sorted(str(p.relative_to(old[0])) for p in old[0].rglob("*")) == before
    assert sorted(p.name for p in run.iterdir()) == ["tensorboard"]  # a fresh run dir (its event file)
    second = rundir.move_aside(run)  # a second move in the same second gets its own name
    assert second != old[0] and second.name.startswith("r.old-") and not run.exists()


def test_held_log_lines_reach_train_log_once_the_run_dir_exists(tmp_path):
    from engine.run.log import attach_run_log, setup_logging

    setup_logging(None, 0)
    logging.getLogger("clip").info("before the run dir")
    logging.getLogger("engine.run.checkpoint").info("from a module")
    assert not (tmp_path / "r").exists()
    attach_run_log(tmp_path / "r")
    logging.getLogger("clip").info("after")
    for h in logging.getLogger("clip").handlers:
        h.flush()
    lines = (tmp_path / "r" / "train.log").read_text().splitlines()
    setup_logging(None, 1)  # leave no file handler behind for other tests
    assert [ln.split(" INFO ")[1] for ln in lines] == ["before the run dir", "from a module", "after"]


class _Engine:
    """Stands in for a DeepSpeed engine whose save_checkpoint fails like torch.save on a full disk."""

    def __init__(self, error):
        self.error = error

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        raise self.error


def _committed(ckpt, step):
    d = ckpt / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 4096)
    (d / checkpoint.META).write_text(json.dumps({"step": step, "client_state": {"run_id": "r"}}))
    (ckpt / checkpoint.LATEST).write_text(d.name + "\n")


def test_disk_full_during_a_save_names_the_path_and_keeps_latest(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    ckpt = tmp_path / "run" / "checkpoints"
    _committed(ckpt, 4)
    # DeepSpeed's torch.save on a full disk: an opaque RuntimeError; the disk has 1 MiB left
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, (10 << 30) - (1 << 20), 1 << 20))
    with pytest.raises(checkpoint.NoSpaceError) as e:
        checkpoint.save(_Engine(RuntimeError("basic_ios::clear: iostream error")), ckpt, 6, {"run_id": "r"}, 1)
    msg = str(e.value)
    assert msg.startswith(f"no space left on {ckpt} while saving checkpoint step_00000006 (1 MiB free")
    assert "the last complete checkpoint step_00000004 stays `latest`" in msg and "\n" not in msg
    assert isinstance(e.value, InputError)  # train.py prints it as one line and exits 2
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert (ckpt / "step_00000004" / checkpoint.META).is_file()
    monkeypatch.undo()

    # ENOSPC raised by a write says so itself, whatever the free space reads now
    with pytest.raises(checkpoint.NoSpaceError, match="no space left on .* step_00000004 stays `latest`"):
        checkpoint.save(_Engine(OSError(errno.ENOSPC, "No space left on device")), ckpt, 6, {"run_id": "r"}, 1)
    # any other failure with room to spare is not dressed up as a full disk
    with pytest.raises(RuntimeError, match="something else") as e:
        checkpoint.save(_Engine(RuntimeError("something else")), ckpt, 6, {"run_id": "r"}, 1)
    assert not isinstance(e.value, checkpoint.NoSpaceError)
    assert (ckpt / "latest").read_text().strip() == "step_00000004"


def test_disk_full_during_the_export_names_the_path_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(checkpoint, "consolidated_fp32_state_dict", lambda engine: {"w": torch.ones(4)})
    real_save = torch.save

    def save_on_a_full_disk(obj, f, *a, **kw):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half")  # the start of the zip, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    target = tmp_path / "run" / "model_fp32.pt"
    target.parent.mkdir()
    with pytest.raises(checkpoint.NoSpaceError) as e:
        checkpoint.export_fp32(None, target, record=None)
    msg = str(e.value)
    assert msg.startswith(f"no space left on {target.parent} while writing {target}") and "\n" not in msg
    assert "zero_to_fp32.py" in msg
    assert list(target.parent.iterdir()) == []  # no half-written model file, under any name

    # a failure with room to spare is not dressed up as a full disk
    monkeypatch.setattr(torch, "save", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else") as e:
        checkpoint.export_fp32(None, target, record=None)
    assert not isinstance(e.value, checkpoint.NoSpaceError)
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.export_fp32(None, target, record=None) == target and target.is_file()


def test_a_save_moves_a_complete_tag_in_its_way_aside_and_clears_debris(tmp_path):
    """Resumed from an older step, a run meets its old future: that complete tag is work (moved
    aside); a half-written one is a crashed save's debris (removed)."""
    class Saves:
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            (tmp_path / "ck" / tag).mkdir(exist_ok=True)
            (tmp_path / "ck" / tag / "model.pt").write_bytes(b"new")

    ck = tmp_path / "ck"
    _committed(ck, 6)
    (ck / "step_00000008").mkdir()
    (ck / "step_00000008" / "partial.pt").write_bytes(b"half")
    (ck / checkpoint.LATEST).write_text("step_00000002\n")
    checkpoint.save(Saves(), ck, 6, {"run_id": "r"}, keep_last=5)
    checkpoint.save(Saves(), ck, 8, {"run_id": "r"}, keep_last=5)
    aside = [p for p in ck.iterdir() if p.name.startswith("step_00000006.old-")]
    assert len(aside) == 1 and (aside[0] / "mp_rank_00_model_states.pt").read_bytes() == b"x" * 4096
    assert not (ck / "step_00000008" / "partial.pt").exists()
    assert (ck / "latest").read_text().strip() == "step_00000008"
