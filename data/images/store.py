"""An LMDB of uint8 image tensors keyed by image id, with a JSON manifest.

Layout (no pickles anywhere, so opening a downloaded store cannot run code):
  key  b"<image id as ASCII decimal>"  ->  raw bytes of a uint8 array [3, R, R] (C-order)
  key  b"__manifest__"                 ->  JSON: format, resolution, shape, dtype, count, mean, std,
                                           resize, source, complete
"resize" is how images became R×R: "squash" or "center-crop" (data.images.transform); a store written before the
key existed was centre-cropped, and reads as such.
The builder writes the manifest with complete=false before the first image and rewrites it with the
final count and complete=true last, so an interrupted build is recognisable and readers refuse it.

A damaged data.mdb (a truncated copy, a disk error) must not crash a reader: LMDB maps the file and
a page past its end kills the process with SIGBUS. `check_lmdb_file` compares the file size with
what LMDB's own meta pages record before the file is mapped, and lmdb errors are re-raised as
InputError naming the store.

A store of format JPEG_FORMAT (written by launch/build_dataset.py --format jpeg) holds the JPEG bytes
of the same pre-transformed R×R image instead; get/get_many decode them (data.images.jpeg), so callers see
the same uint8 arrays either way.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import lmdb
import numpy as np

from data.files import InputError
from data.images.jpeg import decode_jpegs
from data.images.transform import IMAGE_MEAN, IMAGE_STD, LEGACY_RESIZE, check_resize

MANIFEST_KEY = b"__manifest__"
FORMAT = "uint8-chw-v1"
JPEG_FORMAT = "jpeg-rgb-v1"
FORMATS = (FORMAT, JPEG_FORMAT)
RESERVED_PREFIX = b"__"

PathLike = Union[str, os.PathLike]


# LMDB 0.9's meta pages (pages 0 and 1, the newer txnid wins): a 16-byte page header, then
# mm_magic u32, mm_version u32, mm_address, mm_mapsize, two MDB_db records of 48 bytes (the first
# one's md_pad is the page size), mm_last_pg, mm_txnid (all 64-bit on 64-bit builds).
_MDB_MAGIC, _MDB_VERSION = 0xBEEFC0DE, 1
_META = struct.Struct("=16xII8x8xI44x48xQQ")  # magic, version, page size, last page number, txnid


def _rebuild_hint(path: Path) -> str:
    return (f"move {path} away and rebuild it: python launch/build_lmdb.py --input <the same images> "
            f"--output {path} --resolution <R>")


def check_lmdb_file(path: PathLike) -> None:
    """Raise InputError when <path>/data.mdb is shorter than its meta pages say (a truncated copy:
    reading it would SIGBUS) or has no valid meta page. Reads only the first two pages."""
    path = Path(path)
    f = path / "data.mdb"
    size = f.stat().st_size
    metas = []
    with open(f, "rb") as h:
        first = h.read(_META.size)
        if len(first) == _META.size:
            metas.append(_META.unpack(first))
            psize = metas[0][2]
            if 512 <= psize <= 1 << 16 and size >= 2 * psize:
                h.seek(psize)
                second = h.read(_META.size)
                metas.append(_META.unpack(second))
    good = [m for m in metas if m[0] == _MDB_MAGIC]
    if len(good) < 2:
        raise InputError(f"{f}: damaged store ({size} bytes, LMDB header unreadable); {_rebuild_hint(path)}")
    if any(m[1] != _MDB_VERSION for m in good):
        return  # another LMDB data format: leave the checking to the library
    magic, version, psize, last_pg, txnid = max(good, key=lambda m: m[4])
    need = (last_pg + 1) * psize
    if size < need:
        raise InputError(f"{f}: truncated store: {size} bytes, but LMDB's header records {need} "
                         f"({last_pg + 1} pages of {psize}); {_rebuild_hint(path)}")


def id_key(image_id: int) -> bytes:
    return str(int(image_id)).encode("ascii")


def _key_id(key: bytes) -> Optional[int]:
    """Image id of a key, or None for reserved keys."""
    if key.startswith(RESERVED_PREFIX):
        return None
    return int(key)


class ImageStore:
    """Read-only view of a store. Safe to create before DataLoader workers fork: the LMDB
    environment is opened lazily in each process (an environment must not cross a fork), read-only
    and without locks, and it is dropped when pickled for spawned workers."""

    def __init__(self, path: PathLike, readahead: bool = True):
        self.path = Path(path)
        # readahead=True: a 224 px image spans ~37 pages; measured 5k vs 870 img/s on a cold cache.
        self.readahead = readahead
        self._env = None
        self._txn = None
        self._pid = None
        if not (self.path / "data.mdb").is_file():
            raise InputError(f"{self.path}: not an image store (no data.mdb)")
        check_lmdb_file(self.path)
        try:
            raw = self._begin().get(MANIFEST_KEY)
        except lmdb.Error as e:
            raise self._damaged(e) from None
        if raw is None:
            raise InputError(f"{self.path}: no manifest; this is not an image store built by "
                             f"launch/build_lmdb.py (a Chinese-CLIP LMDB must be imported first)")
        self.manifest: Dict = json.loads(bytes(raw).decode("utf-8"))
        self.format = self.manifest.get("format")
        if self.format not in FORMATS:
            raise InputError(f"{self.path}: unknown store format {self.format!r}")
        if not self.manifest.get("complete"):
            raise InputError(f"{self.path}: the build of this store did not finish; rerun "
                             f"launch/build_lmdb.py with the same arguments to resume it")
        self.shape: Tuple[int, ...] = tuple(self.manifest["shape"])
        self.resolution: int = int(self.manifest["resolution"])
        self.mean = tuple(self.manifest["mean"])
        self.std = tuple(self.manifest["std"])
        self.resize: str = self.manifest.get("resize", LEGACY_RESIZE)
        self._nbytes = int(np.prod(self.shape))
        self._ids: Optional[List[int]] = None

    # one environment and one long-lived read transaction per process
    def _begin(self):
        pid = os.getpid()
        if self._txn is None or self._pid != pid:
            if self._env is not None:
                # Inherited through a fork: LMDB handles must not be used across fork, and py-lmdb
                # refuses a second open of the same files while the inherited one counts as open.
                # Closing it here is safe because it was opened without locks (no shared reader
                # table): it only unmaps this process's copy; the parent's handle is untouched.
                try:
                    self._txn.abort()
                    self._env.close()
                except lmdb.Error:
                    pass
            self._env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=self.readahead,
                                  meminit=False, max_readers=2048, subdir=True)
            self._txn = self._env.begin(write=False, buffers=True)
            self._pid = pid
        return self._txn

    def _damaged(self, e: Exception) -> InputError:
        return InputError(f"{self.path / 'data.mdb'}: damaged store ({type(e).__name__}: {e}); "
                          f"{_rebuild_hint(self.path)}")

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_env=None, _txn=None, _pid=None)
        return state

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            self._txn.abort()
            self._env.close()
        self._env = self._txn = self._pid = None

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __contains__(self, image_id) -> bool:
        try:
            return self._begin().get(id_key(image_id)) is not None
        except lmdb.Error as e:
            raise self._damaged(e) from None

    def get(self, image_id: int) -> np.ndarray:
        """uint8 [3, R, R] (a private copy, safe to keep)."""
        if self.format == JPEG_FORMAT:
            return self.get_many([image_id])[0]
        try:
            buf = self._begin().get(id_key(image_id))
        except lmdb.Error as e:
            raise self._damaged(e) from None
        if buf is None:
            raise KeyError(f"image id {image_id} is not in {self.path}")
        return np.frombuffer(buf, dtype=np.uint8, count=self._nbytes).reshape(self.shape).copy()

    def get_encoded(self, image_ids: Sequence[int]) -> List[bytes]:
        """The stored bytes of each image (JPEG bytes in a JPEG store), for a decoder elsewhere."""
        txn = self._begin()
        out = []
        for image_id in image_ids:
            buf = txn.get(id_key(image_id))
            if buf is None:
                raise KeyError(f"image id {image_id} is not in {self.path}")
            out.append(bytes(buf))
        return out

    def get_many(self, image_ids: Sequence[int], out: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 [B, 3, R, R], read straight into one array (no per-image allocation)."""
        if out is None:
            out = np.empty((len(image_ids),) + self.shape, dtype=np.uint8)
        if self.format == JPEG_FORMAT:
            return decode_jpegs(self.get_encoded(image_ids), self.shape, out=out)
        txn = self._begin()
        flat = out.reshape(len(image_ids), -1)
        for i, image_id in enumerate(image_ids):
            try:
                buf = txn.get(id_key(image_id))
            except lmdb.Error as e:
                raise self._damaged(e) from None
            if buf is None:
                raise KeyError(f"image id {image_id} is not in {self.path}")
            flat[i] = np.frombuffer(buf, dtype=np.uint8, count=self._nbytes)
        return out

    def ids(self) -> List[int]:
        """All image ids, sorted numerically (keys only: values are not read)."""
        if self._ids is None:
            ids = []
            try:
                for key in self._begin().cursor().iternext(keys=True, values=False):
                    image_id = _key_id(bytes(key))
                    if image_id is not None:
                        ids.append(image_id)
            except lmdb.Error as e:
                raise self._damaged(e) from None
            self._ids = sorted(ids)
        return list(self._ids)

    def missing(self, image_ids: Iterable[int]) -> List[int]:
        """The ids (in the given order, without repeats) that the store lacks."""
        txn = self._begin()
        seen, out = set(), []
        try:
            for image_id in image_ids:
                if image_id in seen:
                    continue
                seen.add(image_id)
                if txn.get(id_key(image_id)) is None:
                    out.append(image_id)
        except lmdb.Error as e:
            raise self._damaged(e) from None
        return out

    def __repr__(self) -> str:
        return f"ImageStore({str(self.path)!r}, count={len(self)}, shape={self.shape})"


class ImageStoreWriter:
    """Writes images into a (possibly partly built) store. Used by build_store.py and data/built/builder.py.

    Re-opening an existing store resumes it: `existing_ids()` tells the builder what to skip.
    The map grows by doubling whenever LMDB reports it full, so no size has to be guessed."""

    def __init__(self, path: PathLike, resolution: int, source: str = "",
                 mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD,
                 map_size: int = 1 << 28, resize: str = "squash", fmt: str = FORMAT,
                 extra: Optional[Dict] = None):
        if fmt not in FORMATS:
            raise ValueError(f"unknown store format {fmt!r}")
        self.format = fmt
        self.path = Path(path)
        self.resize = check_resize(resize)
        self.path.mkdir(parents=True, exist_ok=True)
        self.resolution = int(resolution)
        self.shape = (3, self.resolution, self.resolution)
        self.nbytes = int(np.prod(self.shape))
        existing = (self.path / "data.mdb").stat().st_size if (self.path / "data.mdb").exists() else 0
        if existing:
            check_lmdb_file(self.path)  # resuming a truncated store would crash or damage it further
        self.env = lmdb.open(str(self.path), map_size=max(map_size, existing), subdir=True,
                             readahead=False, meminit=False, max_dbs=0)
        old = self._read_manifest()
        if old is not None:
            if old.get("format") != fmt:
                raise InputError(f"{self.path}: holds a store of format {old.get('format')!r}")
            if int(old["resolution"]) != self.resolution:
                raise InputError(f"{self.path}: already holds images at resolution {old['resolution']}, "
                                 f"not {self.resolution}; choose another --output")
            if [round(x, 8) for x in old["mean"]] != [round(x, 8) for x in mean] or \
                    [round(x, 8) for x in old["std"]] != [round(x, 8) for x in std]:
                raise InputError(f"{self.path}: was built with another normalisation mean/std")
            if old.get("resize", LEGACY_RESIZE) != self.resize:
                raise InputError(f"{self.path}: already holds images resized by {old.get('resize', LEGACY_RESIZE)}, "
                                 f"not {self.resize}; pass --resize {old.get('resize', LEGACY_RESIZE)} to resume "
                                 f"it, or choose another --output")
            sources = old.get("source", "")
            if source and source not in sources.split(" + "):
                source = f"{sources} + {source}" if sources else source
            else:
                source = sources
        elif self.env.stat()["entries"] > 0:
            raise InputError(f"{self.path}: an LMDB without our manifest; refusing to write into it")
        self.manifest = {
            **(extra or {}),
            "format": fmt, "resolution": self.resolution, "shape": list(self.shape), "dtype": "uint8",
            "layout": "CHW", "mean": list(mean), "std": list(std), "resize": self.resize, "source": source,
            "count": self._count(), "complete": False,
        }
        self._put_manifest()

    def _read_manifest(self) -> Optional[Dict]:
        with self.env.begin() as txn:
            raw = txn.get(MANIFEST_KEY)
        return None if raw is None else json.loads(raw.decode("utf-8"))

    def _count(self) -> int:
        n = 0
        with self.env.begin() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                if not key.startswith(RESERVED_PREFIX):
                    n += 1
        return n

    def _put_manifest(self) -> None:
        data = json.dumps(self.manifest, sort_keys=True).encode("utf-8")
        self._write([(MANIFEST_KEY, data)])

    def _write(self, items: List[Tuple[bytes, bytes]]) -> None:
        """Put items in one transaction (all or nothing), growing the map until they fit."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for k, v in items:
                        txn.put(k, v)
                return
            except lmdb.MapFullError:
                # The failed transaction was aborted; double the map and retry it whole.
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def existing_ids(self) -> set:
        out = set()
        with self.env.begin() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                image_id = _key_id(key)
                if image_id is not None:
                    out.add(image_id)
        return out

    def put_many(self, items: Iterable[Tuple[int, Union[bytes, np.ndarray]]]) -> int:
        """Write (image id, uint8 [3,R,R] array or its raw bytes) pairs in one transaction
        (JPEG bytes in a JPEG store)."""
        batch = []
        for image_id, value in items:
            if self.format == JPEG_FORMAT:
                if not isinstance(value, (bytes, bytearray)) or not value:
                    raise ValueError(f"image {image_id}: a JPEG store takes encoded bytes")
            elif isinstance(value, np.ndarray):
                if value.dtype != np.uint8 or tuple(value.shape) != self.shape:
                    raise ValueError(f"image {image_id}: expected uint8 {self.shape}, got "
                                     f"{value.dtype} {tuple(value.shape)}")
                value = np.ascontiguousarray(value).tobytes()
            elif len(value) != self.nbytes:
                raise ValueError(f"image {image_id}: expected {self.nbytes} bytes, got {len(value)}")
            batch.append((id_key(image_id), value))
        if batch:
            self._write(batch)
        return len(batch)

    def finish(self) -> Dict:
        """Record the final count and mark the store complete (the last write of a build)."""
        self.manifest["count"] = self._count()
        self.manifest["complete"] = True
        self._put_manifest()
        self.env.sync(True)
        return dict(self.manifest)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
