"""What a resume may change (engine/run/resume.py), without processes: the checks against the saved
record, the data position on another world size (against the sampler itself), the watchdog."""
import subprocess
import sys
import time

import pytest

from data.files import InputError
from data.sampler import ShardedSampler
from engine.run.resume import RunShape, check, data_position

SAVED = {"world_size": 2, "micro_batch": 4, "grad_accum": 1, "train_pairs": 96, "zero_stage": 2,
         "precision": "fp32", "epoch": 0, "step_in_epoch": 3, "samples_per_rank_done": 12}


def shape(**kw):
    base = dict(world_size=2, micro_batch=4, grad_accum=1, train_pairs=96, zero_stage=2, precision="fp32")
    return RunShape(**{**base, **kw})


def test_same_global_batch_on_another_world_size_is_accepted():
    check(SAVED, shape(), "ck")
    check(SAVED, shape(world_size=1, grad_accum=2), "ck")
    check(SAVED, shape(world_size=4, micro_batch=2), "ck")


@pytest.mark.parametrize("kw,words", [
    ({"zero_stage": 3}, "saved with ZeRO 2 fp32, this run asks ZeRO 3 fp32"),
    ({"precision": "bf16"}, "saved with ZeRO 2 fp32, this run asks ZeRO 2 bf16"),
    ({"train_pairs": 95}, "saved with 96 training pairs, this run has 95"),
    ({"world_size": 1}, "saved with global batch 8 = micro 4 x 1 x 2 ranks, this run has 4"),
    ({"micro_batch": 8}, "saved with global batch 8"),
    ({"world_size": 1, "grad_accum": 2, "zero_stage": 3}, "saved with ZeRO 2 fp32, this run asks ZeRO 3"),
])
def test_a_change_that_breaks_an_exact_resume_is_refused_in_one_line(kw, words):
    with pytest.raises(InputError) as e:
        check(SAVED, shape(**kw), "runs/a/checkpoints/step_00000003")
    msg = str(e.value)
    assert words in msg and "runs/a/checkpoints/step_00000003" in msg and "\n" not in msg
    assert "--init-from" in msg


def test_every_zero_stage_may_change_the_world_size():
    for stage in (1, 2, 3):  # the universal checkpoint carries each (tests/dist/test_resume_world_size.py)
        saved = {**SAVED, "zero_stage": stage}
        check(saved, shape(zero_stage=stage), "ck")
        check(saved, shape(zero_stage=stage, world_size=1, grad_accum=2), "ck")


def test_an_old_checkpoint_without_the_record_is_accepted_with_a_warning(caplog):
    old = {k: v for k, v in SAVED.items() if k not in ("zero_stage", "precision")}
    with caplog.at_level("WARNING", logger="clip"):
        check(old, shape(zero_stage=3), "ck")
    assert "does not record its ZeRO stage and precision" in caplog.text


@pytest.mark.parametrize("w_old,w_new,micro,gas", [(2, 1, 4, 2), (1, 2, 4, 1), (2, 4, 2, 1), (4, 2, 2, 2)])
def test_the_data_stream_continues_at_the_next_sample_on_another_world_size(w_old, w_new, micro, gas):
    """Oracle: the samples every rank of the old run would have taken next, against the samples the
    new ranks take from the position data_position gives, both through the real sampler."""
    n, seed, g = 96, 7, 8
    old_per_step = g // w_old
    steps_done = 3
    saved = {"world_size": w_old, "micro_batch": old_per_step, "grad_accum": 1, "train_pairs": n,
             "epoch": 1, "step_in_epoch": steps_done, "samples_per_rank_done": steps_done * old_per_step}
    run = RunShape(w_new, micro, gas, n, 2, "fp32")
    epoch, step = data_position(saved, run, steps_per_epoch=n // g)
    assert (epoch, step) == (1, steps_done)

    def consumed_by_step(world, per_rank_per_step, start, steps):
        """The global set of samples of each step from `start` on."""
        out = []
        for s in range(steps):
            taken = set()
            for r in range(world):
                sm = ShardedSampler(n, r, world, seed=seed)
                sm.set_epoch(1, start=start + s * per_rank_per_step)
                taken |= set(list(sm)[:per_rank_per_step])
            out.append(taken)
        return out

    old_next = consumed_by_step(w_old, old_per_step, steps_done * old_per_step, 4)
    new_next = consumed_by_step(w_new, micro * gas, step * micro * gas, 4)
    assert old_next == new_next


def test_the_watchdog_ends_a_process_whose_armed_section_stalls():
    code = ("import time\nfrom engine import dist\nw = dist.Watchdog(1.0, '--dist-timeout')\n"
            "with w.armed('step 1'):\n    pass\ntime.sleep(1.5)\n"  # disarmed: a slow pause is fine
            "with w.armed('step 2'):\n    time.sleep(60)\nprint('not reached')\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stderr
    assert "no progress for 1 s (--dist-timeout) in step 2" in r.stderr
    assert "not reached" not in r.stdout
    assert time.monotonic() - t0 < 50
