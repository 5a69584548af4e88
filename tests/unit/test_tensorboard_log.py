"""TensorBoard scalars across a resume, read back by the tensorboard package itself (the owner of
the format; installed by `make test` from tests/requirements-optional.txt) and by our own reader."""
import pytest

from engine.run.log import ScalarWriter, read_scalars


def _tensorboard_points(log_dir, tag):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(log_dir), size_guidance={accumulator.TENSORS: 0, accumulator.SCALARS: 0})
    acc.Reload()
    # tensorboardX writes simple_value scalars; TensorBoard's data layer keeps them as scalars or
    # tensors depending on its version
    if tag in acc.Tags().get("scalars", []):
        return [(e.step, e.value) for e in acc.Scalars(tag)]
    from tensorboard.util import tensor_util

    return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def test_a_resumed_run_replaces_the_points_after_its_checkpoint(tmp_path):
    """A run killed after step 5 whose last checkpoint was step 4: the resume logs 5 and 6 again."""
    first = ScalarWriter(tmp_path)
    for step in range(1, 6):
        first.add(step, {"train/loss": 10.0 + step})
    first.close()
    resumed = ScalarWriter(tmp_path)  # a new event file in the same folder, as a resume writes
    resumed.restart_at(5)
    for step in (5, 6):
        resumed.add(step, {"train/loss": 20.0 + step})
    resumed.close()

    want = [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 25.0), (6, 26.0)]
    assert read_scalars(tmp_path)["train/loss"] == want
    assert _tensorboard_points(tmp_path, "train/loss") == want


def test_without_the_restart_event_the_old_point_stays(tmp_path):
    """The control: what TensorBoard showed before restart_at existed (two points at step 5)."""
    for values in ({4: 1.0, 5: 2.0}, {5: 3.0}):
        w = ScalarWriter(tmp_path)
        for step, v in values.items():
            w.add(step, {"x": v})
        w.close()
    assert [s for s, _ in _tensorboard_points(tmp_path, "x")] == [4, 5, 5]
