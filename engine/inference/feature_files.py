"""Feature files: write them atomically, read them whole or stream them in row blocks.

Formats
- `.npz` (np.savez, uncompressed): `ids` int64 [N] and `feats` float32/float16 [N, D], row i
  belongs to ids[i], rows L2-normalised; and `meta` (uint8 bytes of a JSON object: what the file
  holds: kind image|text, image_model, text_model, weights, dim, count), so a tool handed the
  wrong folder refuses it (`check_kind`) instead of ranking queries against queries. Files
  written before the record existed have no `meta` and are read with a warning.
- a folder of `.npz` shards, read in name order. Shards written by extraction are named
  `part-RRRRR-of-WWWWW.npz`; a folder of such names must hold one complete set (a run that died
  half-way, or leftovers of a run with another world size, is refused instead of read).
- MUGE jsonl as the seed writes it: {"image_id": id, "feature": [...]} or {"query_id"/"text_id": ...}.

Streaming: np.load decompresses/copies a whole npz member (mmap_mode is ignored for npz), so a
1M x 512 shard would cost 2 GB. Our npz members are stored uncompressed, so `open_features`
finds each `feats` array's byte offset inside the zip and reads row blocks with pread into a
reused buffer: memory stays at one block however large the shard.
"""
from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from data.files import InputError, atomic_write, read_jsonl

FEATURE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
SHARD_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.npz$")
JSONL_ID_KEYS = ("image_id", "query_id", "text_id")
KINDS = ("image", "text")
# What must agree between the image and the text side of one retrieval (one model's two towers).
MODEL_KEYS = ("image_model", "text_model")


def shard_name(rank: int, world: int) -> str:
    return f"part-{rank:05d}-of-{world:05d}.npz"


def _check_arrays(ids: np.ndarray, feats: np.ndarray, where: str) -> Tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids)
    feats = np.asarray(feats)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{where}: ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if feats.ndim != 2 or feats.dtype not in FEATURE_DTYPES:
        raise InputError(f"{where}: feats must be a 2-D float32/float16 array, got {feats.dtype} {feats.shape}")
    if len(ids) != len(feats):
        raise InputError(f"{where}: {len(ids)} ids but {len(feats)} feature rows")
    return ids.astype(np.int64, copy=False), feats


def save_features(path, ids, feats, meta: Optional[Dict[str, Any]] = None) -> Path:
    """Write an uncompressed .npz atomically: the target appears only once complete. `meta` (kind,
    model names, ...) is stored beside the arrays with this file's dim and count added."""
    path = Path(path)
    ids, feats = _check_arrays(ids, feats, str(path))
    arrays = {"ids": ids, "feats": np.ascontiguousarray(feats)}
    if meta is not None:
        if meta.get("kind") not in KINDS:
            raise ValueError(f"meta kind must be one of {KINDS}, got {meta.get('kind')!r}")
        record = {**meta, "dim": int(feats.shape[1]), "count": int(len(ids))}
        arrays["meta"] = np.frombuffer(json.dumps(record, sort_keys=True).encode("utf-8"), np.uint8)
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def write_feature_jsonl(path, ids: np.ndarray, feats: np.ndarray, id_key: str) -> Path:
    """MUGE/seed jsonl: one {"<id_key>": id, "feature": [...]} line per row, atomically."""
    return write_feature_jsonl_parts(path, [(ids, feats)], id_key)


def write_feature_jsonl_parts(path, parts: Iterable[Tuple[np.ndarray, np.ndarray]], id_key: str) -> Path:
    """Like write_feature_jsonl over several (ids, feats) blocks, so shards can be streamed."""
    path = Path(path)
    with atomic_write(path, "w") as f:
        for ids, feats in parts:
            for i, row in zip(ids.tolist(), np.asarray(feats, dtype=np.float32).tolist()):
                f.write(json.dumps({id_key: i, "feature": row}) + "\n")
    return path


# ----------------------------------------------------------------------------------- reading ---

class FeatureSource:
    """Rows of a feature set in a fixed global order: `ids` (all, int64), `dim`, `dtype`, and
    `read(start, stop, out=None)` -> array [stop-start, dim] (without `out`: valid until the next
    read). `meta`: what the files say they hold (see the module docstring), or None."""

    ids: np.ndarray
    dim: int
    dtype: np.dtype
    meta: Optional[Dict[str, Any]] = None

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, start: int, stop: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        raise NotImplementedError


class ArraySource(FeatureSource):
    """Features already in memory: reads are views."""

    def __init__(self, ids: np.ndarray, feats: np.ndarray, where: str = "features"):
        self.ids, self.feats = _check_arrays(ids, feats, where)
        self.dim, self.dtype = self.feats.shape[1], self.feats.dtype

    def read(self, start: int, stop: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        if out is None:
            return self.feats[start:stop]
        out[...] = self.feats[start:stop]
        return out


class _NpzMember:
    """Where a stored (uncompressed) .npy member's data lies inside a zip, for pread."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, name: str):
        info = zf.getinfo(name)
        with zf.open(name) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise InputError(f"{path}: unsupported .npy format version {version} in {name}")
            header_len = f.tell()
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.streamable = info.compress_type == zipfile.ZIP_STORED and not fortran
        with open(path, "rb") as raw:
            raw.seek(info.header_offset)
            local = raw.read(30)
        if local[:4] != b"PK\x03\x04":
            raise InputError(f"{path}: damaged zip (bad local header of {name})")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        self.offset = info.header_offset + 30 + name_len + extra_len + header_len


class NpzShardsSource(FeatureSource):
    """One or more npz files read in row blocks without loading whole `feats` arrays."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        ids, self._members, starts, metas = [], [], [0], []
        dim = dtype = None
        for p in self.paths:
            try:
                with zipfile.ZipFile(p) as zf:
                    names = set(zf.namelist())
                    if not {"ids.npy", "feats.npy"} <= names:
                        raise InputError(f"{p}: expected arrays 'ids' and 'feats', found {sorted(names)}")
                    with zf.open("ids.npy") as f:
                        shard_ids = np.lib.format.read_array(f)
                    member = _NpzMember(p, zf, "feats.npy")
                    metas.append(_read_meta(zf, p) if "meta.npy" in names else None)
            except zipfile.BadZipFile as e:
                raise InputError(f"{p}: not a readable .npz ({e})") from None
            if len(member.shape) != 2 or member.dtype not in FEATURE_DTYPES:
                raise InputError(f"{p}: feats must be 2-D float32/float16, got {member.dtype} {member.shape}")
            shard_ids, _ = _check_arrays(shard_ids, np.empty((len(shard_ids), 0), np.float32), str(p))
            if member.shape[0] != len(shard_ids):
                raise InputError(f"{p}: {len(shard_ids)} ids but {member.shape[0]} feature rows")
            if dim is None:
                dim, dtype = member.shape[1], member.dtype
            elif (member.shape[1], member.dtype) != (dim, dtype):
                raise InputError(f"{p}: feats {member.dtype} x {member.shape[1]} differ from the first "
                                 f"shard's {dtype} x {dim}")
            if metas[-1] is not None and (metas[-1].get("count"), metas[-1].get("dim")) != member.shape:
                raise InputError(f"{p}: its record says {metas[-1].get('count')} x {metas[-1].get('dim')} "
                                 f"features, the file holds {member.shape[0]} x {member.shape[1]}")
            ids.append(shard_ids)
            self._members.append(member)
            starts.append(starts[-1] + len(shard_ids))
        if dim is None:
            raise InputError("no feature shards given")
        self.meta = _merge_meta(metas, self.paths)
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.dim, self.dtype = dim, dtype
        self._starts = np.asarray(starts, dtype=np.int64)
        self._buf = np.empty(0, dtype=self.dtype)

    def read(self, start: int, stop: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows [start, stop) into `out`, or into a buffer reused by the next call."""
        n = stop - start
        if out is None:
            if self._buf.size < n * self.dim:
                self._buf = np.empty(n * self.dim, dtype=self.dtype)
            out = self._buf[: n * self.dim].reshape(n, self.dim)
        row = start
        while row < stop:
            s = int(np.searchsorted(self._starts, row, side="right")) - 1
            lo, hi = row - self._starts[s], min(stop, self._starts[s + 1]) - self._starts[s]
            self._read_shard(s, int(lo), int(hi), out[row - start: row - start + hi - lo])
            row += hi - lo
        return out

    def _read_shard(self, s: int, lo: int, hi: int, out: np.ndarray) -> None:
        member, path = self._members[s], self.paths[s]
        if not member.streamable:  # compressed by someone else's writer: fall back to a full load
            with np.load(path) as z:
                out[...] = z["feats"][lo:hi]
            return
        row_bytes = self.dim * self.dtype.itemsize
        want = (hi - lo) * row_bytes
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(path, "rb", buffering=0) as f:
            got = 0
            while got < want:
                k = os.preadv(f.fileno(), [view[got:want]], member.offset + lo * row_bytes + got)
                if k <= 0:
                    raise InputError(f"{path}: truncated feature data")
                got += k


def _read_meta(zf: zipfile.ZipFile, path: Path) -> Dict[str, Any]:
    with zf.open("meta.npy") as f:
        raw = np.lib.format.read_array(f, allow_pickle=False)
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{path}: unreadable feature record ('meta' is not JSON)") from None
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
        raise InputError(f"{path}: feature record without a kind ({'/'.join(KINDS)})")
    return meta


def _merge_meta(metas: List[Optional[Dict[str, Any]]], paths: List[Path]) -> Optional[Dict[str, Any]]:
    """One record for a set of shards (count summed); shards that disagree are refused."""
    if all(m is None for m in metas):
        return None
    if any(m is None for m in metas):
        odd = [p.name for p, m in zip(paths, metas) if m is None]
        raise InputError(f"{paths[0].parent}: shards with and without a feature record mixed ({odd})")
    same = {k: v for k, v in metas[0].items() if k != "count"}
    for p, m in zip(paths, metas):
        if {k: v for k, v in m.items() if k != "count"} != same:
            raise InputError(f"{p}: its record {m} differs from {paths[0].name}'s {metas[0]}: shards of "
                             f"different extractions mixed")
    return {**same, "count": sum(int(m["count"]) for m in metas)}


def _describe(meta: Dict[str, Any]) -> str:
    models = " + ".join(str(meta[k]) for k in MODEL_KEYS if meta.get(k))
    return f"{meta.get('count', '?')} {meta['kind']} features" + (f" of {models}" if models else "")


def check_kind(meta: Optional[Dict[str, Any]], expected: str, where: str) -> Optional[str]:
    """Refuse (InputError) features of the other kind than `expected` ('image' or 'text'); return a
    warning for files without a record (written before records existed, or someone else's npz),
    None when all is well. `where` names the flag and path for the message."""
    if meta is None:
        return (f"{where}: no record of what these features are (written before feature records, or "
                f"not by engine/inference/extract.py); assuming {expected} features")
    if meta["kind"] != expected:
        raise InputError(f"{where} holds {_describe(meta)}, not {expected} features (are the image and "
                         f"text feature paths swapped?)")
    return None


def check_same_model(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]], where_a: str, where_b: str) -> None:
    """Refuse two feature sets from different models (their spaces do not match); sets without a
    record cannot be checked and pass."""
    if a is None or b is None:
        return
    diff = [k for k in MODEL_KEYS if k in a and k in b and a[k] != b[k]]
    if diff or a.get("dim") != b.get("dim"):
        raise InputError(f"{where_a} ({_describe(a)}, dim {a.get('dim')}) and {where_b} ({_describe(b)}, "
                         f"dim {b.get('dim')}) come from different models; extract both with the same "
                         f"--model, --text-model and --weights")


def feature_shard_paths(folder: Path) -> List[Path]:
    """The npz files of a shard folder in order; refuses incomplete or mixed extraction sets."""
    files = sorted(p for p in folder.iterdir() if p.suffix == ".npz" and not p.name.startswith("."))
    if not files:
        raise InputError(f"{folder}: no .npz feature shards in this folder")
    parts = [SHARD_RE.match(p.name) for p in files]
    if any(parts):
        if not all(parts):
            odd = [p.name for p, m in zip(files, parts) if not m]
            raise InputError(f"{folder}: extraction shards mixed with other .npz files: {odd}")
        worlds = {m.group(2) for m in parts}
        if len(worlds) > 1:
            raise InputError(f"{folder}: shards of runs with different world sizes ({sorted(worlds)}): "
                             f"remove the stale ones")
        world = int(worlds.pop())
        ranks = sorted(int(m.group(1)) for m in parts)
        if ranks != list(range(world)):
            missing = sorted(set(range(world)) - set(ranks))
            raise InputError(f"{folder}: incomplete extraction, shards of ranks {missing} of {world} are "
                             f"missing (did a rank fail?)")
    return files


def _load_jsonl(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    ids, rows, dim, key = [], [], None, None
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        k = next((k for k in JSONL_ID_KEYS if k in obj), None)
        if k is None or "feature" not in obj:
            raise InputError(f"{where}: expected an id ({'/'.join(JSONL_ID_KEYS)}) and a 'feature' list")
        key = key or k
        i, feat = obj[k], obj["feature"]
        if not isinstance(i, int) or isinstance(i, bool):
            raise InputError(f"{where}: id {i!r} is not an integer")
        if not isinstance(feat, list) or not feat:
            raise InputError(f"{where}: 'feature' of id {i} must be a non-empty list of numbers")
        if dim is None:
            dim = len(feat)
        elif len(feat) != dim:
            raise InputError(f"{where}: feature of id {i} has {len(feat)} values, earlier lines {dim}")
        ids.append(i)
        rows.append(feat)
    if dim is None:
        raise InputError(f"{path}: no features in this file")
    try:
        feats = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"{path}: a 'feature' holds something that is not a number") from None
    return np.asarray(ids, dtype=np.int64), feats, key


def open_features(path) -> FeatureSource:
    """An npz, a folder of npz shards or a MUGE jsonl, as a FeatureSource (npz data streamed)."""
    path = Path(path)
    if path.is_dir():
        src: FeatureSource = NpzShardsSource(feature_shard_paths(path))
    elif not path.exists():
        raise InputError(f"{path}: feature file not found")
    elif path.suffix == ".npz":
        src = NpzShardsSource([path])
    elif path.suffix in (".jsonl", ".json"):
        ids, feats, id_key = _load_jsonl(path)
        src = ArraySource(ids, feats, where=str(path))
        # MUGE jsonl says what it holds through its id key
        src.meta = {"kind": "image" if id_key == "image_id" else "text", "dim": src.dim, "count": len(ids),
                    **({"queries_schema": "chinese-clip"} if id_key == "text_id" else {})}
    else:
        raise InputError(f"{path}: unknown feature format (want .npz, a folder of .npz, or .jsonl)")
    _check_unique(src.ids, str(path))
    return src


def load_features(path, dtype: Optional[np.dtype] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int64 [N], feats [N, D]) from any supported format, fully in memory."""
    return read_all(open_features(path), dtype)


def read_all(src: FeatureSource, dtype: Optional[np.dtype] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(ids, feats) of an opened source, fully in memory."""
    if isinstance(src, ArraySource):
        feats = src.feats
    else:
        feats = src.read(0, len(src), out=np.empty((len(src), src.dim), src.dtype))
    if dtype is not None:
        feats = feats.astype(dtype, copy=False)
    return src.ids, feats


def _check_unique(ids: np.ndarray, where: str) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1][:10].tolist()
        raise InputError(f"{where}: duplicate ids {dup} (each image/query must appear once)")


def remove_shards(folder: Path) -> None:
    """Delete earlier extraction shards in `folder` (only our part-*-of-* names), so a new run's
    set can never be mixed with a previous one."""
    if folder.is_dir():
        for p in folder.iterdir():
            if SHARD_RE.match(p.name):
                p.unlink()
