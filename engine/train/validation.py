"""Full-pool retrieval recall of a model on a split, for the trainer's validation.

The same three steps as the CLIs (engine.inference.extract -> engine.retrieval.search -> engine.scoring.recall), in
memory: every rank encodes its shard, the features are gathered, every rank searches its blocks,
the top-k lists are merged, and every rank computes the same scores. Image->text runs the same
exact top-k engine with the roles swapped (images are the queries, texts the database).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence

import deepspeed
import numpy as np
import torch

from engine.scoring.recall import direction_scores, flat_scores, invert_references
from engine.inference.extract import encode_images, encode_texts, eval_mode, gather_features
from engine.inference.feature_files import ArraySource
from engine.scoring.recall import muge_scores
from engine.retrieval.search import distributed_search, plan_blocks, rows_to_ids


def exact_topk_ids(query_feats: np.ndarray, db_ids: np.ndarray, db_feats: np.ndarray, k: int,
                   device: torch.device, max_memory_mb: float = 2048) -> np.ndarray:
    """Ids [Q, k] of the k best database rows per query (score, then lower row), every rank."""
    plan = plan_blocks(len(query_feats), len(db_ids), db_feats.shape[1], k, max_memory_mb=max_memory_mb)
    _, rows = distributed_search(query_feats, ArraySource(db_ids, db_feats), k, plan,
                                 device=torch.device(device))
    return rows_to_ids(db_ids, rows)


def _encode(model, store, queries, tokenizer, context_length, batch_size, device, image_ids):
    ids = store.ids() if image_ids is None else list(image_ids)
    with eval_mode(model):
        img = gather_features(*encode_images(model, store, ids, batch_size, device))
        txt = gather_features(*encode_texts(model, queries, tokenizer, context_length, batch_size, device))
    return img, txt


def _scored(queries) -> Dict[int, list]:
    scored = {q.query_id: q.item_ids for q in queries if q.item_ids}
    if not scored:
        raise ValueError("no validation query has item_ids to score against")
    return scored


def evaluate_retrieval(model, store, queries, tokenizer, context_length: int, batch_size: int,
                       device: torch.device, k: int = 10, image_ids: Optional[Sequence[int]] = None,
                       max_memory_mb: float = 2048) -> Dict[str, float]:
    """{"r1", "r5", "r10", "mean_recall"} in percent over the queries that have item_ids, against
    every image of `store` (or `image_ids`). Call on every rank (or without a process group)."""
    scored = _scored(queries)
    (img_ids, img_feats), (q_ids, q_feats) = _encode(model, store, queries, tokenizer, context_length,
                                                     batch_size, device, image_ids)
    top = exact_topk_ids(q_feats, img_ids, img_feats, min(k, len(img_ids)), device, max_memory_mb)
    predictions = {int(q): top[i].tolist() for i, q in enumerate(q_ids)}
    return muge_scores(predictions, scored)


def evaluate_both_directions(model, store, queries, tokenizer, context_length: int, batch_size: int,
                             device: torch.device, k: int = 10, image_ids: Optional[Sequence[int]] = None,
                             max_memory_mb: float = 2048) -> Dict[str, float]:
    """Text->image and image->text recall from one encoding pass: engine.scoring.recall.flat_scores
    (r1/r5/r10/mean_recall for t2i as evaluate_retrieval gives them, t2i_*, i2t_*,
    mean_recall_both). Image->text scores the images that at least one scored query lists."""
    scored = _scored(queries)
    (img_ids, img_feats), (q_ids, q_feats) = _encode(model, store, queries, tokenizer, context_length,
                                                     batch_size, device, image_ids)
    top = exact_topk_ids(q_feats, img_ids, img_feats, min(k, len(img_ids)), device, max_memory_mb)
    t2i = direction_scores({int(q): top[i].tolist() for i, q in enumerate(q_ids)}, scored)
    image_refs = invert_references(scored)
    listed = np.isin(img_ids, np.fromiter(image_refs, np.int64, len(image_refs)))
    if not listed.any():
        raise ValueError("no image of the validation store is listed by a validation query")
    shown = img_ids[listed]
    top = exact_topk_ids(img_feats[listed], q_ids, q_feats, min(k, len(q_ids)), device, max_memory_mb)
    i2t = direction_scores({int(i): top[n].tolist() for n, i in enumerate(shown)},
                           {int(i): image_refs[int(i)] for i in shown})
    return flat_scores(t2i, i2t)


def describe(metrics: Dict[str, float]) -> str:
    """The validation log line's numbers, both directions when present."""
    text = (f"text->image mean recall {metrics['mean_recall']:.2f} (R@1 {metrics['r1']:.2f} "
            f"R@5 {metrics['r5']:.2f} R@10 {metrics['r10']:.2f})")
    if "i2t_mean_recall" in metrics:
        text += (f", image->text mean recall {metrics['i2t_mean_recall']:.2f} (R@1 {metrics['i2t_r1']:.2f} "
                 f"R@5 {metrics['i2t_r5']:.2f} R@10 {metrics['i2t_r10']:.2f}), "
                 f"both {metrics['mean_recall_both']:.2f}")
    return text


def _full_root_params(module, zero_stage: int):
    """Under ZeRO-3, the parameters held directly by the CLIP module (text_projection, logit_scale)
    are only gathered inside its forward; encode_text/encode_image called on their own need them
    gathered (submodules gather theirs through their hooks)."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)))


def validate_in_training(module, zero_stage: int, store, queries, tokenizer, context_length: int,
                         batch_size: int, device: torch.device) -> Dict[str, float]:
    """evaluate_both_directions on the module a DeepSpeed engine trains (every rank takes part),
    in eval mode and back to training mode after."""
    module.eval()
    try:
        with torch.no_grad(), _full_root_params(module, zero_stage):
            return evaluate_both_directions(module, store, queries, tokenizer, context_length, batch_size,
                                            device, k=10)
    finally:
        module.train()
