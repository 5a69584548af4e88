"""Retrieval recall, both directions: pure functions, no I/O.

The definition is MUGE's ("hit" semantics): a query scores 1 at cut-off r when ANY of its first r
predicted ids is one of its reference ids, however many references it has. Mean recall is the
average of R@1, R@5 and R@10.

The arithmetic follows the MUGE server step by step (fractions first, their mean, then x100), so
scores are not just close to the server's but the same floats.

Image->text uses the same hit semantics (Chinese-CLIP's). Ground truth comes from one queries file: a
text's correct images are its item_ids; an image's correct texts are the queries that list it. An
image that no query lists has no correct text and is left out of image->text (as in Chinese-CLIP,
whose image->text reference is derived from the same annotation). The mean recall of both
directions is the mean of the six numbers R@1/5/10 text->image and R@1/5/10 image->text.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Sequence

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


# --- both directions ------------------------------------------------------------------------------

def invert_references(text_refs: Mapping[int, Iterable[int]]) -> Dict[int, List[int]]:
    """{query: [images]} -> {image: [queries listing it]} (ascending query ids). Images that no
    query lists do not appear: they have nothing to be scored against."""
    image_refs: Dict[int, List[int]] = {}
    for qid in sorted(text_refs):
        for img in dict.fromkeys(text_refs[qid]):  # a query listing an image twice counts once
            image_refs.setdefault(int(img), []).append(int(qid))
    return image_refs


def direction_scores(predictions: Mapping[int, Sequence[int]],
                     references: Mapping[int, Iterable[int]]) -> Dict[str, float]:
    """{"r1", "r5", "r10", "mean_recall"} in percent for one direction: predictions and
    references keyed by the query side of that direction (texts for t2i, images for i2t)."""
    return muge_scores(predictions, references)


def combine(t2i: Mapping[str, float], i2t: Mapping[str, float]) -> float:
    """Mean recall over both directions: the mean of the six R@k values, in percent."""
    six = [t2i[f"r{r}"] for r in (1, 5, 10)] + [i2t[f"r{r}"] for r in (1, 5, 10)]
    return sum(six) / 6.0


def flat_scores(t2i: Mapping[str, float], i2t: Mapping[str, float]) -> Dict[str, float]:
    """One flat dict for logs and TensorBoard: today's t2i keys (r1, r5, r10, mean_recall) so that
    existing curves continue, the same under t2i_*, the image->text ones under i2t_*, and
    mean_recall_both."""
    out = dict(t2i)
    out.update({f"t2i_{k}": v for k, v in t2i.items()})
    out.update({f"i2t_{k}": v for k, v in i2t.items()})
    out["mean_recall_both"] = combine(t2i, i2t)
    return out
