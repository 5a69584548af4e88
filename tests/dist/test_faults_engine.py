"""Faults: a rank that dies mid-run makes the other exit non-zero within a minute (never hang);
a NaN/inf loss stops the run naming the step, before the bad update."""
import math
import time

import pytest
import torch

from engine.train.step import ContrastiveStep, NonFiniteLoss
from tests.dist.workers.engine_common import make_data, train_argv, write_ds
from tests.ranks import run_ranks


def test_dead_rank_makes_the_other_exit_nonzero(tmp_path):
    data = make_data(tmp_path / "data")
    ds = write_ds(tmp_path / "ds.json", stage=2, micro=4)
    t0 = time.monotonic()
    results = run_ranks(train_argv(data, ds, tmp_path / "runs", "dead", ["--epochs", "50", "--save-frequency", "0",
                                                                         "--dist-timeout", "30"]),
                        timeout=450, env={"CLIP_TEST_DIE_AT_STEP": "2", "CLIP_TEST_DIE_RANK": "1",
                                          "CLIP_TEST_DIE_HOW": "exit"})
    elapsed = time.monotonic() - t0
    out0 = results[0].output
    assert "TIMEOUT" not in out0, out0[-3000:]
    assert results[1].returncode == 1
    assert results[0].returncode not in (0, None), out0[-3000:]
    assert "step 2/" in out0  # it got going before the peer died
    assert "train.py: done" not in out0
    # startup (~10-20 s on 2 quiet cores, minutes on a busy machine) + the time to notice the dead
    # peer (seconds); a hang would end only at run_ranks' timeout (TIMEOUT above)
    assert elapsed < 300, elapsed


class FakeEngine:
    """Records what ContrastiveStep asks of an engine (single process, no DeepSpeed)."""

    def __init__(self, model):
        self.model, self.backwards, self.steps = model, 0, 0

    def __call__(self, x, t):
        return self.model(x, t)

    def backward(self, loss):
        self.backwards += 1
        loss.backward()

    def step(self):
        self.steps += 1


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
        self.logit_scale = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        return {"image_features": self.img(x), "text_features": self.txt(t), "logit_scale": self.logit_scale.exp()}


@pytest.mark.parametrize("exact,k", [(True, 1), (True, 2), (False, 2)])
def test_nonfinite_loss_stops_before_any_backward(exact, k):
    engine = FakeEngine(Tiny())
    bad = lambda i, t, s: (i * t).sum() * float("nan")  # noqa: E731
    stepper = ContrastiveStep(engine, bad, k, exact=exact, step_index=lambda: 41)
    batches = [(torch.randn(2, 3), torch.randn(2, 3)) for _ in range(k)]
    with pytest.raises(NonFiniteLoss, match="loss is nan at optimizer step 42"):
        stepper.run(batches)
    assert engine.backwards == 0 and engine.steps == 0
    inf = lambda i, t, s: (i * t).sum() + math.inf  # noqa: E731
    with pytest.raises(NonFiniteLoss, match="loss is inf"):
        ContrastiveStep(engine, inf, k, exact=exact, step_index=lambda: 0).run(batches)


def _stopped_rank(launcher):
    """The rank process (launch/train.py) that is SIGSTOPped, if any: only ranks count, so no other
    child of the launcher that happens to be in a stopped state can start the clock."""
    import psutil

    for child in launcher.children(recursive=True):
        try:
            if child.status() == psutil.STATUS_STOPPED and _is_rank(child):
                return child
        except psutil.NoSuchProcess:
            pass
    return None


def _is_rank(p):
    try:
        return any(a.endswith("launch/train.py") for a in p.cmdline())
    except Exception:  # noqa: BLE001 - gone already
        return False


def test_hung_rank_ends_every_process_through_the_deepspeed_launcher(tmp_path):
    """Rank 1 SIGSTOPs itself in step 3 before its update (a hung rank: alive, silent), so rank 0
    waits in ZeRO's gradient-norm all-reduce on DeepSpeed's own process group. Run as users run it, under
    `deepspeed --num_gpus 2`: rank 0 must give up on its own (--dist-timeout 20 reaches ZeRO's groups
    too) and exit non-zero naming the timeout; the launcher then ends the stopped rank. Every process
    must be gone about a minute after the stop."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from tests.ranks import base_env, free_port

    data = make_data(tmp_path / "data")
    ds = write_ds(tmp_path / "ds.json", stage=2, micro=4)
    argv = train_argv(data, ds, tmp_path / "runs", "hung", ["--epochs", "50", "--save-frequency", "0"])
    argv[argv.index("--dist-timeout") + 1] = "20"
    launcher_bin = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = base_env({"CLIP_TEST_DIE_AT_STEP": "3", "CLIP_TEST_DIE_RANK": "1", "CLIP_TEST_DIE_HOW": "stop",
                    "CLIP_TEST_DIE_BEFORE_UPDATE": "1",
                    "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")})
    log = open(tmp_path / "launcher.log", "w+")
    proc = subprocess.Popen([launcher_bin, "--num_gpus", "2", "--master_port", str(free_port()), *argv],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    launcher = psutil.Process(proc.pid)

    def alive(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    everyone, ranks, stopped, t_stop, survivor_gone, gone_at = set(), set(), None, None, None, None
    deadline = time.monotonic() + 600  # startup on a busy machine, then at most 150 s after the stop
    try:
        while time.monotonic() < deadline:
            try:
                everyone |= set(launcher.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
            if t_stop is None and (stopped := _stopped_rank(launcher)) is not None:
                t_stop = time.monotonic()
                deadline = min(deadline, t_stop + 240)
            ranks |= {p for p in everyone if p not in ranks and _is_rank(p)}  # not the launcher's processes
            if t_stop and survivor_gone is None and not any(alive(p) for p in ranks - {stopped}):
                survivor_gone = time.monotonic()
            if proc.poll() is not None and not any(alive(p) for p in everyone):
                gone_at = time.monotonic()
                break
            time.sleep(0.5)
    finally:
        for p in everyone | {launcher}:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()
    log.seek(0)
    out = log.read()
    log.close()
    assert t_stop is not None, out[-4000:]
    since = {k: (v - t_stop if v else None) for k, v in (("survivor", survivor_gone), ("all", gone_at))}
    print(f"seconds from the stop until gone: {since}")
    # Before the fix the survivor waited on ZeRO's group with gloo's 30-minute default: still alive here.
    assert gone_at is not None, f"processes still alive 240 s after the stop\n{out[-4000:]}"
    # The survivor gives up 20 s (--dist-timeout) after it starts waiting (measured on a quiet
    # machine: ~21 s after the stop). It may reach the collective well after its peer stopped when the
    # machine is busy (its own step is still running), hence the margin.
    assert since["survivor"] is not None and since["survivor"] < 20 + 70, since
    # Then DeepSpeed's launcher SIGTERMs the stopped rank, which a stopped process cannot act on, and
    # SIGKILLs it 30 s later: every process gone ~31 s after the survivor (measured: ~51 s after the stop).
    assert since["all"] - since["survivor"] < 30 + 30, (since, out[-4000:])
    assert proc.returncode not in (0, None), out[-4000:]
    assert "step 2/" in out and "step 3/" not in out and "train.py: done" not in out
    assert "no progress for 20 s (--dist-timeout)" in out, out[-4000:]  # the survivor says why it gave up
