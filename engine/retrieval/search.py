"""Exact top-k text-to-image retrieval: blocked matrix multiply with a running top-k merge.

Scores are inner products of L2-normalised features (= cosine). The image set is cut into blocks
on a fixed global grid of rows; each block is read once (streamed from disk when the features are
npz shards), multiplied with every query chunk, and its per-query top-k is merged into a running
top-k. With several ranks, each rank takes a contiguous range of blocks, and the per-rank top-k
lists are gathered and merged. Because blocks sit on the same grid whatever the world size, every
score is computed by the same matmul call on 1 or N ranks: results are bit-identical.

Order: score descending, ties to the lower global image row ("canonical"). Libraries order exact
ties (duplicate images) arbitrarily; `canonical_topk` does not.

Per block, a full torch.topk over every score would cost ~13% of the matmul on these CPUs.
Instead we take the max of each group of G consecutive columns (a cheap vectorised pass), keep
the k best groups, and run the exact selection on those k*G columns only. This is exact: a group
holding one of the k best entries has a max at least that entry's score, and at most k-1 groups
can rank above it (each would contribute a distinct better entry); ties between groups go to the
lower group, i.e. the lower rows, like ties between entries.

That block selection is the GPU path (`_search_blocks`): image blocks are copied to the device
and everything runs in torch there. On the CPU, `_search_cpu` hands the blocks to
engine/retrieval/cpu_topk.py instead (cache-sized tiles, numpy/OpenBLAS matmuls, a running k-th best per
query selected in C); same order, same grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from data.files import InputError
from engine.inference.feature_files import FeatureSource
from engine.retrieval.cpu_topk import SENTINEL  # row of a padding entry (int64 max): sorts after every real row
from engine.retrieval.cpu_topk import even_query_chunk, search_blocks


class _LazyModule:
    """Imports a module on first use. `import torch` costs 2 s (11 s on a loaded machine) and a
    one-process CPU search (`search_local`, launch/retrieve.py) never needs it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        import importlib

        return getattr(importlib.import_module(self._name), attr)


torch = _LazyModule("torch")
dist = _LazyModule("engine.dist")  # imports torch
CPU_TILE = (1280, 2048, 16)  # queries x images per CPU score tile, row groups scanned per tile


# ------------------------------------------------------------------------- exact selection ----

def canonical_topk(values: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k largest values and their columns, ties to the lower column, sorted by
    (value desc, column asc). `values` [m, n] with n >= k, no NaN.

    torch.topk finds the right values but picks arbitrarily among entries tied at the k-th value.
    Asking it for k+1 shows where such a tie straddles the cut (the (k+1)-th equals the k-th) for
    free; those rows (rare: duplicate images) are redone exactly."""
    m, n = values.shape
    if n < k:
        raise ValueError(f"need at least k={k} columns, got {n}")
    if n == k:
        cols = torch.arange(n, device=values.device).expand(m, n)
        return _sort_canonical(values, cols)
    vals, cols = torch.topk(values, k + 1, dim=1)
    straddles = vals[:, k] == vals[:, k - 1]
    vals, cols = vals[:, :k], cols[:, :k]
    if k > 1 and bool((vals[:, 1:] == vals[:, :-1]).any()):  # ties inside the top k: order by column
        vals, cols = _sort_canonical(vals, cols)
    if bool(straddles.any()):
        rows = straddles.nonzero().squeeze(1)
        vals, cols = vals.clone(), cols.clone()
        vals[rows], cols[rows] = _exact_topk(values[rows], k)
    return vals, cols


def _sort_canonical(vals: torch.Tensor, cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    by_col = cols.sort(1).indices
    vals, cols = vals.gather(1, by_col), cols.gather(1, by_col)
    by_val = torch.sort(vals, dim=1, descending=True, stable=True).indices  # stable: ties keep column order
    return vals.gather(1, by_val), cols.gather(1, by_val)


def _exact_topk(values: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """canonical_topk without the fast path: everything above the k-th value, then the lowest
    columns equal to it."""
    m = values.shape[0]
    kth = torch.topk(values, k, dim=1, sorted=False).values.amin(1, keepdim=True)
    above = values > kth
    tied = values == kth
    need = k - above.sum(1, keepdim=True)
    take = above | (tied & (tied.cumsum(1) <= need))
    cols = take.nonzero()[:, 1].view(m, k)  # row-major: ascending columns within a row
    return _sort_canonical(values.gather(1, cols), cols)


def merge_topk(vals: torch.Tensor, rows: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Canonical top-k of candidate lists [m, c] given as (score, global row) pairs."""
    by_row = torch.sort(rows, dim=1).indices  # so "lower column" means "lower row" among ties
    vals, rows = vals.gather(1, by_row), rows.gather(1, by_row)
    top_vals, cols = canonical_topk(vals, k)
    return top_vals, rows.gather(1, cols)


def block_topk(scores: torch.Tensor, k: int, group: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Canonical top-k columns of a score block [m, n]; padding columns hold -inf. Uses the
    group-max shortcut when the block has more than k groups of `group` columns."""
    m, n = scores.shape
    if group <= 1 or n % group or n // group <= k:
        return canonical_topk(scores, k)
    grouped = scores.view(m, n // group, group)
    _, best = canonical_topk(grouped.amax(2), k)
    best = best.sort(1).values  # ascending groups, so gathered columns stay in row order
    # whole groups copied at once: faster than an element-wise gather
    cand = grouped[torch.arange(m, device=scores.device).unsqueeze(1), best].view(m, k * group)
    vals, pick = canonical_topk(cand, k)
    return vals, best.gather(1, pick // group) * group + pick % group


# ----------------------------------------------------------------------------- the search ----

@dataclass(frozen=True)
class Plan:
    """Block sizes; a function of the problem and the flags only, so every rank agrees."""
    query_chunk: int
    image_block: int
    group: int
    # CPU path (engine/retrieval/cpu_topk.py): cache-resident tiles of tile_images x tile_queries scores,
    # scanned through maxima of tile_group strided row groups.
    tile_queries: int = 1280
    tile_images: int = 2048
    tile_group: int = 16

    def num_blocks(self, n_images: int) -> int:
        return math.ceil(n_images / self.image_block)


def plan_blocks(n_queries: int, n_images: int, dim: int, k: int, max_memory_mb: float = 2048,
                query_chunk: Optional[int] = None, image_block: Optional[int] = None,
                group: int = 128) -> Plan:
    """Pick chunk sizes so queries + results + working buffers stay under max_memory_mb.

    Resident: the queries (fp32) and the running top-k. Working: two score blocks (qc x nb fp32,
    one being multiplied while the other is searched), the image block (raw + fp32 copy), the
    group maxima and the gathered k*group candidates. Explicit query_chunk / image_block win
    over the budget; image_block is rounded down to whole groups.

    Defaults (1024 x 65536, groups of 128) were the fastest of those tried at 5k x 30k and
    20k x 100k x 512 on 2 cores: wide blocks spread the per-row cost of the selection over many
    columns.
    """
    budget = max_memory_mb * 2**20
    resident = n_queries * dim * 4 + n_queries * k * 12 * 3
    if resident > budget * 0.75:
        raise InputError(f"{n_queries} queries x {dim} need {resident / 2**20:.0f} MB resident; "
                         f"raise --max-memory-mb above {resident / 0.75 / 2**20:.0f}")
    group = max(1, group)
    qc = max(1, min(query_chunk or 1024, n_queries))
    nb = image_block or 65536
    nb = max(group, nb - nb % group) if nb >= group else nb

    def working(qc: int, nb: int) -> float:
        return (2 * qc * nb * 4 + nb * dim * 8 + qc * (nb // group) * 24 + qc * k * group * 40) * 1.25

    while working(qc, nb) > budget - resident:
        if image_block is None and nb > 4 * group and nb >= 8 * qc:
            nb = max(group, (nb // 2) - (nb // 2) % group)
        elif query_chunk is None and qc > 64:
            qc //= 2
        elif image_block is None and nb > group:
            nb = max(group, (nb // 2) - (nb // 2) % group)
        else:
            raise InputError(f"--max-memory-mb {max_memory_mb} is too small for these sizes")
    if image_block is None:  # no wider than the image set, rounded up to whole groups
        nb = min(nb, math.ceil(max(n_images, 1) / group) * group)
    # CPU tiles: never wider than the blocks asked for (so small explicit sizes test the tiling).
    tq = even_query_chunk(n_queries, min(query_chunk or CPU_TILE[0], CPU_TILE[0]))  # the tiles are a few MB
    return Plan(query_chunk=qc, image_block=nb, group=group, tile_queries=tq,
                tile_images=min(nb, CPU_TILE[1]), tile_group=min(group, CPU_TILE[2]))


def _check_finite(x: np.ndarray, what: str, first_row: int, ids: Optional[np.ndarray]) -> None:
    # Fast path: a NaN or inf makes its row's sum NaN or inf (half the time of isfinite + all). A
    # finite row whose sum overflows only sends us to the exact check below. Not a matmul with
    # ones, though a little faster: a multi-threaded BLAS call leaves OpenBLAS's threads spinning
    # for ~0.1 s, which took ~10% from the top-k lanes started right after it (5k x 30k).
    if x.dtype == np.float32 and x.ndim == 2:
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(x.sum(axis=1)).all():
                return
    ok = np.isfinite(x).all(axis=1)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0]) + first_row
        name = f"id {int(ids[bad])}" if ids is not None else f"row {bad}"
        raise InputError(f"{what} {name} has a NaN or infinite feature value")


def _checked_queries(queries: np.ndarray, images: FeatureSource) -> np.ndarray:
    """The queries as C-contiguous fp32, after checking their dimension and values."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != images.dim:
        raise InputError(f"query features have dimension {queries.shape[-1]}, image features {images.dim}")
    _check_finite(queries, "query", 0, None)
    return queries


def search(queries: np.ndarray, images: FeatureSource, k: int, plan: Plan,
           blocks: Optional[Sequence[int]] = None, device: Optional[torch.device] = None,
           progress: bool = False, torch_blocks: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the given image blocks (all by default) for every query, on this process.

    Returns (scores float32 [Q, k], rows int64 [Q, k]) on the CPU, in canonical order; entries
    beyond the rows these blocks hold are (-inf, SENTINEL). The CPU searches with engine/retrieval/cpu_topk.py;
    any other device with torch blocks (`_search_blocks`), which torch_blocks=True also asks for on
    the CPU (so the GPU's path is tested without a GPU).
    """
    device = device or torch.device("cpu")
    queries = _checked_queries(queries, images)
    blocks = range(plan.num_blocks(len(images))) if blocks is None else blocks
    if device.type == "cpu" and not torch_blocks:
        vals, rows = _search_cpu(queries, images, k, plan, blocks, progress)
        return torch.from_numpy(vals), torch.from_numpy(rows)
    if device.type != "cuda":
        return _search_blocks(queries, images, k, plan, blocks, device, progress)
    # TF32 (if the trainer enabled it) rounds inputs to 10 mantissa bits: not exact enough to rank.
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return _search_blocks(queries, images, k, plan, blocks, device, progress)
    finally:
        torch.set_float32_matmul_precision(previous)


def _search_blocks(queries, images, k, plan, blocks, device, progress):
    """The device search: each image block is uploaded as stored (fp16 halves the copy) and
    multiplied in fp32 with each query chunk; `block_topk` selects from the [chunk, block] scores
    (padded with -inf to whole groups) and `merge_topk` folds that into the running top-k."""
    n_q, n_img = len(queries), len(images)
    q_dev = torch.from_numpy(queries).to(device)
    best_vals = torch.full((n_q, k), float("-inf"), device=device)
    best_rows = torch.full((n_q, k), SENTINEL, dtype=torch.int64, device=device)
    bar = _progress(len(blocks), progress)
    try:
        for b in blocks:
            r0 = b * plan.image_block
            r1 = min(r0 + plan.image_block, n_img)
            raw = images.read(r0, r1)
            _check_finite(raw, "image", r0, images.ids)
            nb = r1 - r0
            g = plan.group if nb > plan.group * k else 1  # a small last block is searched whole
            padded = max(math.ceil(nb / g) * g, k)  # at least k columns to choose from
            block = torch.from_numpy(np.ascontiguousarray(raw)).to(device).float()
            for q0 in range(0, n_q, plan.query_chunk):
                q1 = min(q0 + plan.query_chunk, n_q)
                s = q_dev[q0:q1] @ block.T
                if padded != nb:  # a copy: only for a block that is not whole groups
                    s = torch.nn.functional.pad(s, (0, padded - nb), value=float("-inf"))
                vals, cols = block_topk(s, k, g)
                rows = torch.where(cols < nb, cols + r0, SENTINEL)
                vals = torch.where(cols < nb, vals, float("-inf"))
                best_vals[q0:q1], best_rows[q0:q1] = merge_topk(
                    torch.cat([best_vals[q0:q1], vals], 1), torch.cat([best_rows[q0:q1], rows], 1), k)
            bar.update(1)
    finally:
        bar.close()
    return best_vals.cpu(), best_rows.cpu()


def _search_cpu(queries, images, k, plan, blocks, progress):
    buf = np.empty(0, np.float32)

    def read_block(b):
        nonlocal buf
        r0 = b * plan.image_block
        r1 = min(r0 + plan.image_block, len(images))
        raw = images.read(r0, r1)
        _check_finite(raw, "image", r0, images.ids)
        if raw.dtype == np.float32 and raw.flags.c_contiguous:
            return r0, raw
        if buf.size < raw.size:
            buf = np.empty(raw.size, np.float32)
        block = buf[: raw.size].reshape(raw.shape)
        block[...] = raw  # fp16 storage, fp32 arithmetic
        return r0, block

    bar = _progress(len(blocks), progress)
    try:
        vals, rows = search_blocks(queries, read_block, blocks, k, plan.tile_queries, plan.tile_images,
                                   plan.tile_group, on_block=lambda: bar.update(1))
    finally:
        bar.close()
    return vals, rows


def search_local(queries: np.ndarray, images: FeatureSource, k: int, plan: Plan, progress: bool = False
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """search() over every block in this one process on the CPU, as numpy arrays, without
    importing torch. Needs at least k images."""
    if len(images) < k:
        raise InputError(f"top-{k} needs at least {k} images, the image features hold {len(images)}")
    queries = _checked_queries(queries, images)
    return _search_cpu(queries, images, k, plan, range(plan.num_blocks(len(images))), progress)


def distributed_search(queries: np.ndarray, images: FeatureSource, k: int, plan: Plan,
                       device: Optional[torch.device] = None, progress: bool = False
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """search() with the image blocks split over the ranks; every rank returns the merged,
    identical result. Needs at least k images."""
    if len(images) < k:
        raise InputError(f"top-{k} needs at least {k} images, the image features hold {len(images)}")
    mine = dist.shard_range(plan.num_blocks(len(images)))
    world = dist.world_size()
    try:
        vals, rows = search(queries, images, k, plan, blocks=mine, device=device,
                            progress=progress and dist.is_main())
        error = None
    except InputError as e:  # e.g. a NaN in this rank's blocks: every rank must hear of it
        error = str(e)
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        raise InputError(errors[0])
    if world > 1:
        all_vals = dist.all_gather_uneven(vals).view(world, -1, k)
        all_rows = dist.all_gather_uneven(rows).view(world, -1, k)
        vals, rows = merge_topk(torch.cat(list(all_vals), 1), torch.cat(list(all_rows), 1), k)
    assert not (rows == SENTINEL).any(), "top-k left a padding entry although there are >= k images"
    return vals, rows


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="top-k image blocks", unit="block", disable=not enabled)


# ------------------------------------------------------------------------------ output ----

def rows_to_ids(image_ids: np.ndarray, rows: torch.Tensor) -> np.ndarray:
    """Image ids [Q, k] of the top-k rows."""
    return np.asarray(image_ids)[np.asarray(rows)]  # rows: a CPU tensor or a numpy array
