"""Build an ImageStore from the formats our users already have.

Sources (each yields records: image id, where it came from, the encoded image):
  - a MUGE `*_imgs.tsv`: `image_id<TAB>base64 JPEG` per line (MUGE uses the URL-safe alphabet;
    both alphabets are accepted);
  - a folder of image files named `<image id>.<ext>` (searched recursively);
  - a Chinese-CLIP LMDB: key str(image id) -> base64 JPEG (its `imgs/` folder or the parent of it).
    Only the `imgs` database is opened; Chinese-CLIP's `pairs` database holds pickles and is never read.

Decoding runs in a pool of processes, in order, with a bounded number of chunks in flight (Pool.imap
would read the whole input ahead into memory). Each chunk is committed in one transaction, so an
interrupted build keeps every committed chunk, and a rerun skips the ids already written.
"""
from __future__ import annotations

import base64
import binascii
import collections
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import lmdb

from data.files import InputError, atomic_write
from data.images import IMAGE_MEAN, IMAGE_STD, check_resize, load_and_preprocess
from data.lmdb_store import ImageStoreWriter

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


@dataclass
class BuildResult:
    written: int = 0
    already_present: int = 0
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)  # (id, where, reason)
    manifest: dict = field(default_factory=dict)
    report_path: Optional[Path] = None


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
    path = Path(path)
    if path.is_file():
        if path.name == "data.mdb":
            return open_source(path.parent)
        return "tsv", tsv_records(path), path.stat().st_size, "B"
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    imgs = chinese_clip_imgs_dir(path)
    if imgs is not None:
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


def _decode_chunk(args) -> List[Tuple[Optional[int], str, Optional[bytes], str]]:
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


def _chunks(records: Iterator[Record], done: set, size: int, result: BuildResult,
            bar) -> Iterator[List[Item]]:
    """Group records into chunks, skipping ids already in the store and flagging duplicates.

    A repeat is checked before "already in the store": after an interrupted build the first copy of
    an id may be committed, and its second copy must be refused as in a clean build, not skipped."""
    seen: set = set()
    chunk: List[Item] = []
    for rec in records:
        bar.update(rec.progress)
        error = rec.error
        if not error:
            if rec.image_id in seen:
                error = f"duplicate image id {rec.image_id}"
            elif rec.image_id in done:
                seen.add(rec.image_id)
                result.already_present += 1
                continue
            seen.add(rec.image_id)
        chunk.append((rec.image_id, rec.where, b"" if error else rec.payload, rec.is_base64, error))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_store(input_path: PathLike, output: PathLike, resolution: int, on_error: str = "fail",
                workers: Optional[int] = None, chunk_size: int = 64, report_path: Optional[PathLike] = None,
                map_size: int = 1 << 28, progress: bool = True, mean=IMAGE_MEAN, std=IMAGE_STD,
                resize: str = "squash") -> BuildResult:
    """Build (or resume) the store at `output` from `input_path`. See the module docstring.

    on_error="fail": the first bad image raises BuildError naming its id and line; the images before
    it are kept (the store stays marked incomplete), so a rerun after fixing the input resumes.
    on_error="skip": bad images are listed in `report_path` (default <output>/skipped.tsv) and the
    build completes without them. workers=0 or 1 decodes in this process. resize: "squash" (R×R,
    Chinese-CLIP's) or "center-crop" (see data.images.preprocess_image); the manifest records it.
    """
    from tqdm import tqdm

    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    check_resize(resize)
    input_path = Path(input_path)
    kind, records, total, unit = open_source(input_path)
    result = BuildResult()
    workers = max(1, os.cpu_count() or 1) if workers is None else max(0, int(workers))
    # The pool forks before the LMDB environment is opened: an environment must not cross a fork.
    pool = None
    if workers > 1:
        pool = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers)
    try:
        writer = ImageStoreWriter(output, resolution, source=f"{kind}:{input_path.resolve()}",
                                  mean=mean, std=std, map_size=map_size, resize=resize)
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=f"build {Path(output).name}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def handle(decoded):
        good = []
        for image_id, where, arr, err in decoded:
            if arr is not None:
                good.append((image_id, arr))
            elif on_error == "fail":
                result.written += writer.put_many(good)  # keep what came before the bad image
                raise BuildError(f"{where}: image id {image_id}: {err}")
            else:
                result.skipped.append((str(image_id), where, err))
        result.written += writer.put_many(good)

    try:
        chunks = _chunks(records, writer.existing_ids(), chunk_size, result, bar)
        if pool is None:
            for chunk in chunks:
                handle(_decode_chunk((chunk, resolution, resize)))
        else:
            # Bounded look-ahead: at most 4 chunks per worker are read and waiting.
            pending: collections.deque = collections.deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_decode_chunk, ((chunk, resolution, resize),)))
                while len(pending) >= 4 * workers:
                    handle(pending.popleft().get())
            while pending:
                handle(pending.popleft().get())
        bar.close()
        if on_error == "skip":
            result.report_path = Path(report_path) if report_path else Path(output) / "skipped.tsv"
            with atomic_write(result.report_path) as f:
                f.write("image_id\twhere\treason\n")
                for image_id, where, reason in result.skipped:
                    f.write(f"{image_id}\t{where}\t{reason}\n")
        result.manifest = writer.finish()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        writer.close()
    return result
