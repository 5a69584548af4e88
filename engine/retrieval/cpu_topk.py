"""Exact top-k on the CPU: score tiles of a few MB, a running k-th best score per query, and a
selection that only looks at the entries above it. Two selections give the same results:
`HeapTopK`, a C scan into a heap per query (engine/retrieval/csrc/topk_heap.c, built by topk_native.py),
and `RunningTopK`, numpy's, used where the C scan cannot be built; this docstring describes the
numpy one, whose design the C scan replaces with one compare per entry.

Why: scoring a 1024 x 65536 block at once (268 MB) and selecting over it afterwards reads every
score back from DRAM, which cost ~1/3 of the matmul time at 20k x 100k x 512. Here each matmul
writes a tile of `image_tile` x `query_chunk` scores (a few MB, still in cache when it is read),
and one pass over it finds what can enter the top-k:

- tiles are image-major, [images, queries]: a query's scores form a column. Column groups of
  rows {j, j + w, j + 2w, ...} (w = n / G) then have their maxima in an elementwise maximum of G
  contiguous slices of the tile, the cheapest pass numpy has (~4% of the matmul at G = 16).
- per query, `thr` is the k-th best score so far; an entry can enter only if it is > thr (an
  entry equal to it comes from a later row, so it loses the tie). After the first tiles almost
  nothing passes, so the merge costs almost nothing.
- only the groups whose max passes are looked at entry by entry (found with a 1-D flatnonzero:
  numpy's 2-D nonzero is ~15x slower and cost more than the max pass itself).
- a query without k entries yet (its first tile) takes as bound the k-th largest group max: the
  k best groups hold k distinct entries at least that large, so everything in the top k is >= it.

Tiles of one query must come in ascending image rows (the strict > relies on it); callers walk
the blocks in order. Ties: score descending, then row ascending, like `retrieval.canonical_topk`.

`search_blocks` splits the queries over one worker thread per BLAS thread ("lanes"), each with
its own one-thread matmuls and running top-k (see engine/retrieval/blas_threads.py for why).
"""
from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Optional, Tuple

import numpy as np

SENTINEL = np.iinfo(np.int64).max  # row of a padding entry: sorts after every real row
PAD_KEY = np.uint64(np.iinfo(np.uint64).max)  # sort key of a padding entry: after every real one
MAX_ROWS = 0xFFFFFFFF  # rows must fit the low 32 bits of a sort key (and not collide with PAD_KEY)


class _TopK:
    """What a running top-k gives back, from its sorted keys."""

    def sorted_keys(self) -> np.ndarray:
        raise NotImplementedError

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        """([Q, k] float32 scores best first, -inf where fewer than k images were seen;
        [Q, k] int64 image rows in that order, SENTINEL where there is none)."""
        keys = self.sorted_keys()
        rows = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
        rows[keys == PAD_KEY] = SENTINEL
        return _key_scores(keys), rows


class HeapTopK(_TopK):
    """Per-query best k over the tiles fed to `add_tile`, selected by the C scan of
    engine/retrieval/csrc/topk_heap.c (a heap per query); the same results as RunningTopK at less cost."""

    def __init__(self, n_queries: int, k: int, scan):
        self.k, self.scan = k, scan
        self.heap_v = np.full((n_queries, k), -np.inf, np.float32)
        self.heap_r = np.full((n_queries, k), SENTINEL, np.int64)
        self.count = np.zeros(n_queries, np.int64)
        self.thr = np.full(n_queries, -np.inf, np.float32)
        # Addresses taken once: numpy's .ctypes per call costs about as much as scanning a small tile.
        self._ptr = [a.ctypes.data for a in (self.heap_v, self.heap_r, self.count, self.thr)]

    def add_tile(self, scores: np.ndarray, q0: int, r0: int) -> None:
        """Scores [n, m] float32, C-contiguous and finite, of image rows r0..r0+n against queries
        q0..q0+m; rows must come in ascending order per query."""
        n, m = scores.shape
        if scores.dtype != np.float32 or not scores.flags.c_contiguous or not 0 <= q0 <= len(self.thr) - m:
            raise ValueError("add_tile needs a C-contiguous float32 tile of this top-k's queries")
        hv, hr, cnt, thr = self._ptr
        self.scan(scores.ctypes.data, n, m, r0, self.k, hv + q0 * self.k * 4, hr + q0 * self.k * 8,
                  cnt + q0 * 8, thr + q0 * 4)

    def flush(self) -> None:
        """Nothing waits: the heaps are always up to date."""

    def sorted_keys(self) -> np.ndarray:
        keys = _sort_key(self.heap_v, self.heap_r)
        keys[self.heap_r == SENTINEL] = PAD_KEY
        return np.sort(keys, axis=1)


class RunningTopK(_TopK):
    """Per-query best k (scores desc, rows asc) over the tiles fed to `add_tile`, selected in
    numpy: the fallback where the C scan cannot be built."""

    def __init__(self, n_queries: int, k: int, group: int):
        self.k, self.group = k, max(1, group)
        # Each query's best k as sort keys (see _sort_key), ascending = canonical order: a merge
        # is then one np.sort of integers, without an argsort and two gathers.
        self.keys = np.full((n_queries, k), PAD_KEY, np.uint64)
        self.thr = np.full(n_queries, -np.inf, np.float32)  # entries must be > thr to enter
        self.full = np.zeros(n_queries, bool)  # holds k real entries: thr is its k-th score
        # Candidates not merged yet, per query chunk: a merge re-sorts k entries per query it
        # touches, so late tiles (a candidate for few queries each) are merged in batches. The
        # threshold stays a little stale meanwhile, which only lets a few more candidates in.
        self.pending = {}

    def add_tile(self, scores: np.ndarray, q0: int, r0: int) -> None:
        """Scores [n, m], C-contiguous, of image rows r0..r0+n against queries q0..q0+m."""
        n, m = scores.shape
        k, g = self.k, self.group
        if g > 1 and n // g >= k and n % g:  # whole groups first, then the few rows left over
            cut = n - n % g
            self.add_tile(scores[:cut], q0, r0)
            self.add_tile(scores[cut:], q0, r0 + cut)
            return
        if n // g < k:
            g = 1
        w = n // g
        flat = scores.reshape(-1)  # entry (row i, query c) is flat[i * m + c]
        gmax = _group_max(flat, g, w * m).reshape(w, m)  # [j, c]: max over rows j, j + w, ...
        thr = self.thr[q0:q0 + m]
        fresh = ~self.full[q0:q0 + m]
        any_fresh = bool(fresh.any())
        if any_fresh:
            if w >= k:  # k-th largest group max, taken inclusively (nextafter down)
                kth = np.partition(gmax[:, fresh], w - k, axis=0)[w - k]
                thr[fresh] = np.nextafter(kth, np.float32(-np.inf))
            else:
                thr[fresh] = -np.inf
        hit = np.flatnonzero(gmax > thr)  # j * m + c
        if len(hit) == 0:
            return
        if g > 1:  # the g entries of each hit group, by flat index, rows ascending
            idx = hit[:, None] + (w * m) * np.arange(g)
            vals = flat.take(idx)
            keep = np.flatnonzero(vals > thr[hit % m][:, None])
            idx, cand_v = idx.ravel().take(keep), vals.ravel().take(keep)
        else:
            idx, cand_v = hit, flat.take(hit)
        rows, cand_q = np.divmod(idx, m)
        waiting = self.pending.setdefault(q0, [])
        waiting.append((cand_q + q0, cand_v, rows + r0))
        if any_fresh or sum(len(c[0]) for c in waiting) >= 4 * m:
            self.flush(q0)

    def flush(self, q0=None) -> None:
        """Merge the pending candidates (of one query chunk, or all)."""
        for key in ([q0] if q0 is not None else list(self.pending)):
            parts = self.pending.pop(key, [])
            if parts:
                q, v, r = (np.concatenate(a) for a in zip(*parts))
                local = q - key  # < the chunk's queries: a 16-bit stable argsort is a radix sort
                order = np.argsort(local.astype(np.uint16) if len(q) and local.max() < 2**16 else local,
                                   kind="stable")
                self._merge(q[order], v[order], r[order])

    def sorted_keys(self) -> np.ndarray:
        """[Q, k] sort keys of each query's best k, in canonical order (see _sort_key)."""
        return self.keys

    def _merge(self, q: np.ndarray, v: np.ndarray, r: np.ndarray) -> None:
        """Merge candidates (query q ascending, score v, row r) into the running top-k."""
        k = self.k
        starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
        counts = np.diff(np.r_[starts, len(q)])
        uq = q[starts]
        which = np.repeat(np.arange(len(uq)), counts)
        pos = np.arange(len(q)) - starts[which]
        cand = np.full((len(uq), k + int(counts.max())), PAD_KEY, np.uint64)
        cand[:, :k] = self.keys[uq]
        cand[which, k + pos] = _sort_key(v, r)
        cand.sort(axis=1)  # keys are distinct: a row enters once per query
        top = cand[:, :k]
        self.keys[uq] = top
        full = top[:, k - 1] != PAD_KEY
        self.full[uq] = full
        self.thr[uq] = np.where(full, _key_scores(top[:, k - 1]), -np.inf)


def _group_max(flat: np.ndarray, g: int, size: int) -> np.ndarray:
    """Elementwise maximum of the g contiguous slices flat[i * size:(i + 1) * size]: one
    streaming pass, ~2.5x faster than numpy's reduction over the middle axis of [m, g, w]
    (the earlier query-major layout)."""
    if g == 1:
        return flat
    parts = flat.reshape(g, size)
    out = np.maximum(parts[0], parts[1])
    for i in range(2, g):
        np.maximum(out, parts[i], out=out)
    return out


def _sort_key(vals: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One uint64 per entry whose ascending order is (score desc, row asc). High half: the
    float's bits made order-preserving, then flipped; low half: the row (< MAX_ROWS)."""
    bits = (vals + np.float32(0.0)).view(np.uint32)  # + 0.0: -0.0 becomes 0.0, equal like in torch
    up = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))  # ascending with the score
    return ((~up).astype(np.uint64) << np.uint64(32)) | rows.astype(np.uint64)


def _key_scores(keys: np.ndarray) -> np.ndarray:
    """The scores of sort keys (-inf for PAD_KEY): _sort_key's high half undone."""
    up = ~(keys >> np.uint64(32)).astype(np.uint32)
    bits = np.where(up >> 31, up & np.uint32(0x7FFFFFFF), ~up)
    return np.where(keys == PAD_KEY, np.float32(-np.inf), bits.view(np.float32))


class _Lane:
    """The queries [a, b) of a search: their running top-k and a score buffer. Lanes never share
    state; each runs in its own thread."""

    def __init__(self, queries: np.ndarray, k: int, query_chunk: int, image_tile: int, group: int, scan):
        self.queries, self.query_chunk, self.image_tile = queries, query_chunk, image_tile
        self.top = HeapTopK(len(queries), k, scan) if scan else RunningTopK(len(queries), k, group)
        self.out = np.empty(min(query_chunk, len(queries)) * image_tile, np.float32)

    def search_block(self, block: np.ndarray, r0: int) -> None:
        nb = len(block)
        for q0 in range(0, len(self.queries), self.query_chunk):
            q = self.queries[q0:q0 + self.query_chunk]
            for t0 in range(0, nb, self.image_tile):
                tile = block[t0:t0 + self.image_tile]
                s = self.out[: len(tile) * len(q)].reshape(len(tile), len(q))
                np.matmul(tile, q.T, out=s)  # image-major: see the module docstring
                self.top.add_tile(s, q0, r0 + t0)


MIN_LANE_QUERIES = 64  # fewer queries per lane would make the matmuls too thin to pay


def lane_bounds(n_queries: int, query_chunk: int, lanes: int):
    """Query ranges of the lanes: whole query chunks (so each matmul is the same call whatever
    the lane count), as even as the chunks allow."""
    chunks = -(-n_queries // query_chunk)
    lanes = max(1, min(lanes, chunks, n_queries // MIN_LANE_QUERIES))
    cuts = [min(n_queries, (chunks * j // lanes) * query_chunk) for j in range(lanes + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


CHUNKS_MULTIPLE = 4  # query chunks come in a multiple of this, so 1, 2 or 4 lanes share them evenly


def even_query_chunk(n_queries: int, most: int) -> int:
    """Queries per chunk, at most `most`, in a multiple of CHUNKS_MULTIPLE chunks of equal size
    when there are enough queries, so that the lanes (whole chunks each) get equal work: 5,000
    queries at most 1,280 are 4 chunks of 1,250 (not 3 of 1,280 and one of 1,160), 20,000 are
    16 of 1,250. 1,250 x 2,048 tiles ran the one-thread matmuls at ~190 GFLOP/s, 625 x 2,048 at
    ~170, so the chunks are not made smaller than needed."""
    tq = max(1, min(most, n_queries))
    chunks = -(-n_queries // tq)
    if n_queries >= CHUNKS_MULTIPLE * 256 and chunks % CHUNKS_MULTIPLE:
        chunks += CHUNKS_MULTIPLE - chunks % CHUNKS_MULTIPLE
    return -(-n_queries // chunks)


def search_blocks(queries: np.ndarray, read_block, blocks, k: int, query_chunk: int,
                  image_tile: int, group: int, on_block=None, lanes: Optional[int] = None,
                  native: Optional[bool] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k over image blocks on the CPU. `read_block(b)` returns (first row, fp32 rows [nb, D]
    C-contiguous) for block b; blocks must come in ascending row order. Each block is cut into
    tiles of `image_tile` rows; every tile x query chunk is one matmul into a reused buffer.

    `lanes` threads (default: numpy's BLAS threads, when they can be set) each take a share of
    the query chunks, with the BLAS on one thread meanwhile; 1 lane keeps the BLAS's threads.

    `native`: select with the C scan (HeapTopK) when it can be built (None), always (True: an
    error where it cannot), or never (False: numpy's RunningTopK, which uses `group`)."""
    from engine.retrieval.blas_threads import blas_threads, single_thread_blas
    from engine.retrieval.native_scan import kernel

    scan = kernel() if native is not False else None
    if native and scan is None:
        raise RuntimeError("the C top-k scan is not available here (see the warning logged above)")
    if lanes is None:
        lanes = blas_threads() or 1
    work = [_Lane(queries[a:b], k, query_chunk, image_tile, group, scan)
            for a, b in lane_bounds(len(queries), query_chunk, lanes)]
    with single_thread_blas() if len(work) > 1 else nullcontext():
        last = -1
        for b in blocks:
            r0, block = read_block(b)
            if r0 <= last:
                raise ValueError("image blocks must come in ascending row order")
            if r0 + len(block) > MAX_ROWS:
                raise ValueError(f"the CPU top-k handles at most {MAX_ROWS} images")
            last = r0
            _run_lanes(work, block, r0)
            if on_block is not None:
                on_block()
    for lane in work:
        lane.top.flush()
    results = [lane.top.result() for lane in work]
    if len(results) == 1:
        return results[0]
    return np.concatenate([v for v, _ in results]), np.concatenate([r for _, r in results])


def _run_lanes(work, block: np.ndarray, r0: int) -> None:
    """One block through every lane: lane 0 in this thread, each other one in a thread of its
    own (one per lane, so no lane waits behind another); re-raises the first failure. Threads
    are left to the OS: pinning each lane to a core measured no faster on 2 shared cores."""
    errors = []

    def run(j: int) -> None:
        try:
            work[j].search_block(block, r0)
        except BaseException as e:  # noqa: B036 (handed to the caller below, Ctrl-C included)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j,), name=f"topk-lane-{j}", daemon=True)
               for j in range(1, len(work))]
    for t in threads:
        t.start()
    run(0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
