"""Recall in both directions (text->image and image->text), Chinese-CLIP's semantics: pure functions.

Both directions use the hit semantics of engine.metrics: an item scores 1 at cut-off r when any of
its first r predictions is correct. Ground truth comes from one queries file: a text's correct
images are its item_ids; an image's correct texts are the queries that list it. An image that no
query lists has no correct text and is left out of image->text (as in Chinese-CLIP, whose
image->text reference is derived from the same annotation). The mean recall of both directions is
the mean of the six numbers R@1/5/10 text->image and R@1/5/10 image->text.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Sequence

from engine.metrics import muge_scores

DIRECTIONS = ("t2i", "i2t")


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
