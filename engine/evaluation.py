"""Full-pool text-to-image recall of a model on a split, for the trainer's validation.

The same three steps as the CLIs (engine.extract -> engine.retrieval -> engine.metrics), in
memory: every rank encodes its shard, the features are gathered, every rank searches its image
blocks, the top-k lists are merged, and every rank computes the same scores.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from engine.extract import encode_images, encode_texts, eval_mode, gather_features
from engine.features import ArraySource
from engine.metrics import muge_scores
from engine.retrieval import distributed_search, plan_blocks, rows_to_ids


def evaluate_retrieval(model, store, queries, tokenizer, context_length: int, batch_size: int,
                       device: torch.device, k: int = 10, image_ids: Optional[Sequence[int]] = None,
                       max_memory_mb: float = 2048) -> Dict[str, float]:
    """{"r1", "r5", "r10", "mean_recall"} in percent over the queries that have item_ids, against
    every image of `store` (or `image_ids`). Call on every rank (or without a process group)."""
    scored = {q.query_id: q.item_ids for q in queries if q.item_ids}
    if not scored:
        raise ValueError("no validation query has item_ids to score against")
    ids = store.ids() if image_ids is None else list(image_ids)
    with eval_mode(model):
        img_ids, img_feats = gather_features(*encode_images(model, store, ids, batch_size, device))
        q_ids, q_feats = gather_features(*encode_texts(model, queries, tokenizer, context_length,
                                                       batch_size, device))
    k = min(k, len(img_ids))  # a tiny pool: rank everything
    plan = plan_blocks(len(q_ids), len(img_ids), img_feats.shape[1], k, max_memory_mb=max_memory_mb)
    _, rows = distributed_search(q_feats, ArraySource(img_ids, img_feats), k, plan,
                                 device=torch.device(device))
    top = rows_to_ids(img_ids, rows)
    predictions = {int(q): top[i].tolist() for i, q in enumerate(q_ids)}
    return muge_scores(predictions, scored)
