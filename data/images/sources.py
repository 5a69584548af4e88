"""The image sources our users already have, read as records (image id, where it came from, the
encoded image), and their decoding into the stores' uint8 R×R arrays. Both builders use them: the
image store (build_store.py) and the built data set (data/built/builder.py).

Sources:
  - a MUGE `*_imgs.tsv`: `image_id<TAB>base64 JPEG` per line (MUGE uses the URL-safe alphabet;
    both alphabets are accepted);
  - a folder of image files named `<image id>.<ext>` (searched recursively);
  - a Chinese-CLIP LMDB: key str(image id) -> base64 JPEG (its `imgs/` folder or the parent of it).
    Only the `imgs` database is opened; Chinese-CLIP's `pairs` database holds pickles and is never read
    (its captions are in the package's `{split}_texts.jsonl`: pass that as the queries);
  - webdataset / img2dataset tar shards (shards.py): a .tar, a brace or glob pattern, or URLs; the
    image id is the sample key's (shards.key_image_id).

`decode_chunk` turns a chunk of records into arrays; it runs in the builders' process pools.
"""
from __future__ import annotations

import base64
import binascii
import collections
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, Union

import lmdb

from data.files import InputError, atomic_write
from data.images.shards import expand_shards, is_shard_spec, iter_samples, key_image_id
from data.images.transform import load_and_preprocess

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
PathLike = Union[str, os.PathLike]

# Standard and URL-safe base64 differ only in two characters; map the URL-safe ones to standard.
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")


@dataclass
class Record:
    where: str                 # "file:line" or "file" or "lmdb key ...", for error messages
    image_id: Optional[int]    # None when the id itself could not be read
    payload: bytes = b""       # base64 text or raw file bytes
    is_base64: bool = True
    error: str = ""            # a problem found while reading the source (bad line, bad id)
    progress: int = 1          # how far this record moves the progress bar


class BuildError(InputError):
    """A corrupt image or input line under --on-error fail; names the image id and where it is."""


def decode_base64(payload: bytes) -> bytes:
    """Decode standard or URL-safe base64 (padding optional); raise InputError on anything else."""
    data = payload.strip().translate(_URLSAFE_TO_STD)
    if len(data) % 4:
        data += b"=" * (-len(data) % 4)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"corrupt base64 ({e})") from None


# ---- sources ---------------------------------------------------------------------------------

def _parse_id(text: str) -> int:
    text = text.strip()
    if not text or not (text.isdigit() or (text[0] == "-" and text[1:].isdigit())):
        raise ValueError(text)
    return int(text)


def tsv_records(path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            size = len(line)
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            parts = line.split(b"\t")
            id_text = parts[0].decode("utf-8", "replace")
            try:
                image_id = _parse_id(id_text)
            except ValueError:
                yield Record(where, None, error=f"image id {id_text[:40]!r} is not an integer",
                             progress=size)
                continue
            if len(parts) != 2 or not parts[1].strip():
                yield Record(where, image_id, error=f"expected 'image_id<TAB>base64 image', found "
                             f"{len(parts)} field(s) (truncated line?)", progress=size)
                continue
            yield Record(where, image_id, parts[1], True, progress=size)


def folder_records(path: Path) -> Iterator[Record]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    for p in files:
        try:
            image_id = _parse_id(p.stem)
        except ValueError:
            yield Record(str(p), None, error=f"file name {p.name!r} is not '<integer image id>.<ext>'")
            continue
        yield Record(str(p), image_id, p.read_bytes(), False)


def chinese_clip_imgs_dir(path: Path) -> Optional[Path]:
    """The LMDB folder holding images, for a Chinese-CLIP LMDB (`imgs/` or its parent)."""
    if (path / "data.mdb").is_file():
        return path
    if (path / "imgs" / "data.mdb").is_file():
        return path / "imgs"
    return None


def shard_records(urls: List[str]) -> Iterator[Record]:
    """The images of tar shards (their captions are not read here)."""
    for url in urls:
        for s in iter_samples(url, caption_from=None):
            image_id = key_image_id(s.key)[0] if s.reason != "truncated tar" else None
            yield Record(s.where, image_id, s.image, False, error=s.error)


PAIRS_NOTE = ("Chinese-CLIP's pairs/ LMDB holds pickles and is never read: give its imgs/ (or the folder "
              "holding imgs/ and pairs/) as the images, and the package's {split}_texts.jsonl as the queries")


def _refuse_pairs_lmdb(path: Path) -> None:
    """Chinese-CLIP's pairs/ database (values are pickles) named where its imgs/ belongs."""
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            pairs = txn.get(b"num_samples") is not None and txn.get(b"num_images") is None
    finally:
        env.close()
    if pairs:
        raise InputError(f"{path}: {PAIRS_NOTE}")


def source_note(path: PathLike) -> Optional[str]:
    """A line to print about what of an image source is not read, or None."""
    path = Path(path)
    if path.is_dir() and (path / "imgs" / "data.mdb").is_file() and (path / "pairs").is_dir():
        return f"{path / 'pairs'}: not read ({PAIRS_NOTE.split(': ', 1)[1]})"
    return None


def lmdb_records(path: Path) -> Iterator[Record]:
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=True, subdir=True, max_dbs=0)
    try:
        with env.begin(buffers=False) as txn:
            for n, (key, value) in enumerate(txn.cursor(), start=1):
                key_text = key.decode("utf-8", "replace")
                if key_text in ("num_images", "num_samples"):  # Chinese-CLIP's count entries
                    continue
                where = f"{path} (record {n}, key {key_text[:40]!r})"
                if key.startswith(b"__"):
                    raise InputError(f"{path}: looks like one of our own stores (key {key_text!r}); "
                                     f"it needs no import")
                try:
                    image_id = _parse_id(key_text)
                except ValueError:
                    yield Record(where, None, error=f"key {key_text[:40]!r} is not an integer image id")
                    continue
                yield Record(where, image_id, value, True)
    finally:
        env.close()


def open_source(path: PathLike) -> Tuple[str, Iterator[Record], Optional[int], str]:
    """(kind, records, progress total, progress unit) for an input path."""
    if is_shard_spec(path):
        urls = expand_shards(str(path))
        return "webdataset", shard_records(urls), None, "img"
    path = Path(path)
    if path.is_file():
        if path.name == "data.mdb":
            return open_source(path.parent)
        return "tsv", tsv_records(path), path.stat().st_size, "B"
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    imgs = chinese_clip_imgs_dir(path)
    if imgs is not None:
        _refuse_pairs_lmdb(imgs)
        env = lmdb.open(str(imgs), readonly=True, lock=False, subdir=True)
        total = env.stat()["entries"]
        env.close()
        return "chinese-clip-lmdb", lmdb_records(imgs), total, "img"
    n = sum(1 for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if n == 0:
        raise InputError(f"{path}: a folder without image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                         f"and not an LMDB")
    return "folder", folder_records(path), n, "img"


# ---- decoding (runs in pool workers) ---------------------------------------------------------

Item = Tuple[Optional[int], str, bytes, bool, str]  # id, where, payload, is_base64, source error


def decode_chunk(args) -> List[Tuple[Optional[int], str, Optional[bytes], str]]:
    """[(id, where, uint8 CHW bytes or None, error)] in input order; items that already carry an
    error (a bad line) pass through so the caller sees problems in file order."""
    items, resolution, resize = args
    out = []
    for image_id, where, payload, is_base64, error in items:
        if error:
            out.append((image_id, where, None, error))
            continue
        try:
            raw = decode_base64(payload) if is_base64 else payload
            out.append((image_id, where, load_and_preprocess(raw, resolution, resize).tobytes(), ""))
        except InputError as e:  # corrupt base64, not an image, truncated image
            out.append((image_id, where, None, str(e)))
    return out


Decoded = List[Tuple[Optional[int], str, Optional[bytes], str]]  # (id, where, bytes or None, error)


def in_order(pool, fn: Callable, chunks: Iterable, workers: int, args: tuple = ()) -> Iterator:
    """fn((chunk, *args)) for every chunk, in input order: in this process without a pool, else in the
    pool with at most 4 chunks per worker read and waiting (Pool.imap would read the whole input
    ahead into memory)."""
    if pool is None:
        for chunk in chunks:
            yield fn((chunk, *args))
        return
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(fn, ((chunk, *args),)))
        while len(pending) >= 4 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def commit_decoded(writer, decoded: Decoded, on_error: str,
                   skip: Callable[[Optional[int], str, str], None]) -> int:
    """Write a decoded chunk's good images; a bad one raises BuildError under on_error "fail" (after
    the good ones before it are written, so a rerun resumes after them), or is handed to
    skip(id, where, reason). Returns how many images were written."""
    good = []
    for image_id, where, data, err in decoded:
        if data is not None:
            good.append((image_id, data))
        elif on_error == "fail":
            writer.put_many(good)
            raise BuildError(f"{where}: image id {image_id}: {err}")
        else:
            skip(image_id, where, err)
    return writer.put_many(good)


def write_skip_report(path: PathLike, rows: Iterable[Tuple[object, str, str]]) -> None:
    """skipped.tsv: one line per image left out, with where it was and why."""
    with atomic_write(path) as f:
        f.write("image_id\twhere\treason\n")
        for image_id, where, reason in rows:
            f.write(f"{image_id}\t{where}\t{reason}\n")
