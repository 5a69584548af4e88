"""Text-to-image retrieval metrics: pure functions, no I/O.

The definition is MUGE's ("hit" semantics): a query scores 1 at cut-off r when ANY of its first r
predicted ids is one of its reference ids, however many references it has. Mean recall is the
average of R@1, R@5 and R@10.

The arithmetic follows the MUGE server step by step (fractions first, their mean, then x100), so
scores are not just close to the server's but the same floats.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Sequence

CUTOFFS = (1, 5, 10)


def hits_at(predicted: Sequence[int], reference: Iterable[int], r: int) -> bool:
    """True when one of the first r predictions is a reference id."""
    ref = reference if isinstance(reference, (set, frozenset)) else set(reference)
    return any(p in ref for p in predicted[:r])


def recall_fractions(predictions: Mapping[int, Sequence[int]], references: Mapping[int, Iterable[int]],
                     cutoffs: Sequence[int] = CUTOFFS) -> Dict[int, float]:
    """{r: fraction of reference queries with a hit in their top r}. Every reference query must
    have a prediction (KeyError otherwise; the MUGE evaluator checks this first with a clear
    message). Predictions for queries outside the reference are ignored, as on the server."""
    if not references:
        raise ValueError("no reference queries to score")
    counts = {r: 0 for r in cutoffs}
    for qid, ref in references.items():
        pred = predictions[qid]
        ref = set(ref)
        for r in cutoffs:
            if hits_at(pred, ref, r):
                counts[r] += 1
    n = len(references)
    return {r: counts[r] * 1.0 / n for r in cutoffs}


def muge_scores(predictions: Mapping[int, Sequence[int]],
                references: Mapping[int, Iterable[int]]) -> Dict[str, float]:
    """{"r1", "r5", "r10", "mean_recall"} in percent."""
    f = recall_fractions(predictions, references, CUTOFFS)
    mean = (f[1] + f[5] + f[10]) / 3.0
    return {"r1": f[1] * 100, "r5": f[5] * 100, "r10": f[10] * 100, "mean_recall": mean * 100}
