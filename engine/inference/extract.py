"""Feature extraction: every rank encodes its shard of images (from the LMDB) and of queries.

Shards are whole batches on a global grid (rank r takes batches shard_range(num_batches, r)):
each image or query is encoded inside the same batch whatever the world size, so 1 and N ranks
give bit-identical features. Every rank also runs the same number of forward passes (a rank
short of one real batch encodes a throw-away one): under ZeRO-3 each forward gathers parameters
collectively, and an extra forward on one rank would hang the others.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from data.images.transform import normalize_uint8
from data.queries import SCHEMAS
from data.tokenizer import tokenize
from engine import dist
from engine.inference.feature_files import (open_features, remove_shards, save_features, shard_name,
                                            write_feature_jsonl_parts)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode and no autograd inside; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _my_batches(n: int, batch_size: int) -> Tuple[List[Tuple[int, int]], int]:
    """This rank's (start, stop) batches of range(n), and the forward count every rank must run."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = math.ceil(n / batch_size)
    mine = dist.shard_range(total)
    steps = math.ceil(total / dist.world_size())
    return [(b * batch_size, min(n, (b + 1) * batch_size)) for b in mine], steps


def _padded(batches: List[Tuple[int, int]], steps: int, n: int) -> Iterator[Tuple[int, int, bool]]:
    """(start, stop, real) for `steps` forwards: the real batches, then throw-away ones."""
    for i in range(steps):
        if i < len(batches):
            yield batches[i][0], batches[i][1], True
        else:
            yield 0, min(1, n), False


def _finish(feats: List[torch.Tensor], dim: int) -> np.ndarray:
    if not feats:
        return np.zeros((0, dim), np.float32)
    out = torch.cat(feats).float()
    # Re-normalise in fp32: a bf16/fp16 model's own normalisation is only good to ~1e-3.
    return F.normalize(out, dim=-1).numpy()


def _encode_shard(ids: np.ndarray, batch_size: int, encode, embed_dim: int, desc: str,
                  progress: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Run `encode(start, stop) -> features` over this rank's batches of `ids` (plus the throw-away
    forwards that keep every rank's count equal) -> (this rank's ids, L2-normalised float32 feats)."""
    from tqdm import tqdm

    batches, steps = _my_batches(len(ids), batch_size)
    feats: List[torch.Tensor] = []
    with tqdm(total=steps, desc=desc, unit="batch", disable=not (progress and dist.is_main())) as bar:
        for start, stop, real in _padded(batches, steps, len(ids)):
            out = encode(start, stop)
            if real:
                feats.append(out.float().cpu())
            bar.update(1)
    mine = np.concatenate([ids[a:b] for a, b in batches]) if batches else ids[:0]
    return mine, _finish(feats, embed_dim)


@torch.no_grad()
def encode_images(model, store, ids: Sequence[int], batch_size: int, device: torch.device,
                  dtype: Optional[torch.dtype] = None, progress: bool = False
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """This rank's shard of `ids` -> (ids int64 [n], feats float32 [n, D] L2-normalised).
    Pixels are normalised on the device with the store manifest's mean/std. Call under
    eval_mode(model) (dropout off); autograd is off here either way."""
    ids = np.asarray(list(ids), dtype=np.int64)
    dtype = dtype or model_dtype(model)

    def encode(start: int, stop: int) -> torch.Tensor:
        pixels = torch.from_numpy(store.get_many(ids[start:stop].tolist())).to(device, non_blocking=True)
        return model.encode_image(normalize_uint8(pixels, store.mean, store.std, dtype=dtype))

    return _encode_shard(ids, batch_size, encode, model.embed_dim, "images", progress)


@torch.no_grad()
def encode_texts(model, queries, tokenizer, context_length: int, batch_size: int,
                 device: torch.device, progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """This rank's shard of `queries` (data.queries.Query) -> (query ids int64, feats float32
    L2-normalised). Call under eval_mode(model)."""
    queries = list(queries)
    qids = np.asarray([q.query_id for q in queries], dtype=np.int64)

    def encode(start: int, stop: int) -> torch.Tensor:
        tokens = tokenize(tokenizer, [q.text for q in queries[start:stop]], context_length)
        return model.encode_text(tokens.to(device, non_blocking=True))

    return _encode_shard(qids, batch_size, encode, model.embed_dim, "queries", progress)


def gather_features(ids: np.ndarray, feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Every rank's (ids, feats) concatenated in rank order (= the global order), on every rank."""
    if dist.world_size() == 1:
        return ids, feats
    all_ids = dist.all_gather_uneven(torch.from_numpy(ids))
    all_feats = dist.all_gather_uneven(torch.from_numpy(np.ascontiguousarray(feats)))
    return all_ids.numpy(), all_feats.numpy()


def _write_split(folder: Path, encode, feature_dtype, jsonl: Optional[Path], id_key: str,
                 meta: Dict[str, Any]) -> Path:
    """Shared by images and texts: clear old shards, encode, write this rank's shard (with its
    record `meta`: kind, models), optionally join all shards into one MUGE jsonl on rank 0."""
    if dist.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        remove_shards(folder)  # a new set is never mixed with an older run's shards
    dist.barrier()
    ids, feats = encode()
    save_features(folder / shard_name(dist.rank(), dist.world_size()), ids, feats.astype(feature_dtype), meta)
    dist.barrier()
    if jsonl is not None and dist.is_main():
        src = open_features(folder)  # checks the set is complete and ids unique
        step = 65536
        parts = ((src.ids[i:i + step], src.read(i, min(i + step, len(src))))
                 for i in range(0, len(src), step))
        write_feature_jsonl_parts(jsonl, parts, id_key)
    dist.barrier()
    return folder


def extract_split(model, out_dir, device: torch.device, batch_size: int = 64, store=None,
                  image_ids: Optional[Sequence[int]] = None, queries=None, tokenizer=None,
                  context_length: int = 52, feature_dtype=np.float32, jsonl: bool = False,
                  progress: bool = True, models: Optional[Dict[str, Any]] = None) -> Dict[str, Path]:
    """Encode a split on every rank and write `out_dir/image_feats/part-R-of-W.npz` (all store
    images, or `image_ids`) and `out_dir/text_feats/...` (the queries); with jsonl=True also
    `out_dir/image_feats.jsonl` and `out_dir/text_feats.jsonl` in the seed's MUGE format.
    `models` (image_model, text_model, weights) goes into each file's record beside its kind."""
    out_dir = Path(out_dir)
    written: Dict[str, Path] = {}
    with eval_mode(model):
        if store is not None:
            ids = store.ids() if image_ids is None else list(image_ids)
            written["image_feats"] = _write_split(
                out_dir / "image_feats",
                lambda: encode_images(model, store, ids, batch_size, device, progress=progress),
                feature_dtype, out_dir / "image_feats.jsonl" if jsonl else None, "image_id",
                {**(models or {}), "kind": "image"})
        if queries is not None:
            schema = getattr(queries, "schema", "muge")  # predictions answer in the queries' schema
            written["text_feats"] = _write_split(
                out_dir / "text_feats",
                lambda: encode_texts(model, queries, tokenizer, context_length, batch_size, device,
                                     progress=progress),
                feature_dtype, out_dir / "text_feats.jsonl" if jsonl else None, SCHEMAS[schema][0],
                {**(models or {}), "kind": "text", "queries_schema": schema})
    if jsonl:
        for key in list(written):
            written[key + "_jsonl"] = out_dir / f"{key}.jsonl"
    return written
