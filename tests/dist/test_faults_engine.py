"""Faults: a rank that dies mid-run makes the other exit non-zero within a minute (never hang);
a NaN/inf loss stops the run naming the step, before the bad update."""
import math
import time

import pytest
import torch

from engine.accumulation import ContrastiveStep, NonFiniteLoss
from tests.dist.workers.engine_common import make_data, train_argv, write_ds
from tests.ranks import run_ranks


def test_dead_rank_makes_the_other_exit_nonzero(tmp_path):
    data = make_data(tmp_path / "data")
    ds = write_ds(tmp_path / "ds.json", stage=2, micro=4)
    t0 = time.monotonic()
    results = run_ranks(train_argv(data, ds, tmp_path / "runs", "dead", ["--epochs", "50", "--save-frequency", "0",
                                                                         "--dist-timeout", "30"]),
                        timeout=150, env={"CLIP_TEST_DIE_AT_STEP": "2", "CLIP_TEST_DIE_RANK": "1",
                                          "CLIP_TEST_DIE_HOW": "exit"})
    elapsed = time.monotonic() - t0
    out0 = results[0].output
    assert "TIMEOUT" not in out0, out0[-3000:]
    assert results[1].returncode == 1
    assert results[0].returncode not in (0, None), out0[-3000:]
    assert "step 2/" in out0  # it got going before the peer died
    assert "train.py: done" not in out0
    # startup (~10-20 s on 2 cores) + the time to notice the dead peer: well under a minute extra
    assert elapsed < 20 + 60, elapsed


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
