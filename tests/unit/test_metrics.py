"""Recall@k with MUGE's hit semantics."""
import pytest

from engine.scoring.recall import hits_at, muge_scores, recall_fractions


def test_hits_at_is_any_reference_in_top_r():
    assert hits_at([3, 4, 5], [9, 5], 3) and not hits_at([3, 4, 5], [9, 5], 2)
    assert not hits_at([], [1], 10)


def test_perfect_and_zero_predictions():
    refs = {1: [5], 2: [6, 7]}
    assert muge_scores({1: [5] + list(range(10, 19)), 2: [7] + list(range(10, 19))}, refs)["mean_recall"] == 100
    assert muge_scores({1: list(range(10, 20)), 2: list(range(10, 20))}, refs)["mean_recall"] == 0
    s = muge_scores({1: list(range(10, 19)) + [5], 2: list(range(10, 20))}, refs)
    assert (s["r1"], s["r5"], s["r10"]) == (0, 0, 50)



def test_missing_prediction_and_empty_reference():
    with pytest.raises(KeyError):
        recall_fractions({}, {1: [2]})
    with pytest.raises(ValueError):
        recall_fractions({}, {})
