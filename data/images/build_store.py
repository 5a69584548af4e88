"""Build an ImageStore (store.py) from any image source (sources.py): a MUGE `*_imgs.tsv`, a folder of
image files, or a Chinese-CLIP LMDB.

Decoding runs in a pool of processes, in order, with a bounded number of chunks in flight (Pool.imap
would read the whole input ahead into memory). Each chunk is committed in one transaction, so an
interrupted build keeps every committed chunk, and a rerun skips the ids already written.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from tqdm import tqdm

from data.images.shards import is_shard_spec
from data.images.sources import (Item, PathLike, Record, commit_decoded, decode_chunk, in_order, open_source,
                                 write_skip_report)
from data.images.store import ImageStoreWriter
from data.images.transform import IMAGE_MEAN, IMAGE_STD, check_resize


@dataclass
class BuildResult:
    written: int = 0
    already_present: int = 0
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)  # (id, where, reason)
    manifest: dict = field(default_factory=dict)
    report_path: Optional[Path] = None



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


def _open(input_path, output: PathLike, resolution: int, workers: int, **store):
    """(kind, records, total, unit, pool or None, writer). The pool forks before the LMDB environment
    is opened: an environment must not cross a fork."""
    kind, records, total, unit = open_source(input_path)
    pool = None
    if workers > 1:
        pool = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers)
    try:
        where = input_path if kind == "webdataset" else Path(input_path).resolve()
        writer = ImageStoreWriter(output, resolution, source=f"{kind}:{where}", **store)
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    return kind, records, total, unit, pool, writer


def build_store(input_path: PathLike, output: PathLike, resolution: int, on_error: str = "fail",
                workers: Optional[int] = None, chunk_size: int = 64, report_path: Optional[PathLike] = None,
                map_size: int = 1 << 28, progress: bool = True, mean=IMAGE_MEAN, std=IMAGE_STD,
                resize: str = "squash") -> BuildResult:
    """Build (or resume) the store at `output` from `input_path`. See the module docstring.

    on_error="fail": the first bad image raises BuildError naming its id and line; the images before
    it are kept (the store stays marked incomplete), so a rerun after fixing the input resumes.
    on_error="skip": bad images are listed in `report_path` (default <output>/skipped.tsv) and the
    build completes without them. workers=0 or 1 decodes in this process. resize: "squash" (R×R,
    Chinese-CLIP's) or "center-crop" (see data.images.transform.preprocess_image); the manifest records it.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    check_resize(resize)
    input_path = str(input_path) if is_shard_spec(input_path) else Path(input_path)  # Path() would mangle a URL
    workers = max(1, os.cpu_count() or 1) if workers is None else max(0, int(workers))
    kind, records, total, unit, pool, writer = _open(input_path, output, resolution, workers, mean=mean,
                                                     std=std, map_size=map_size, resize=resize)
    result = BuildResult()
    bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=f"build {Path(output).name}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        chunks = _chunks(records, writer.existing_ids(), chunk_size, result, bar)
        def skip(image_id, where, reason):
            result.skipped.append((str(image_id), where, reason))

        for decoded in in_order(pool, decode_chunk, chunks, workers, (resolution, resize)):
            result.written += commit_decoded(writer, decoded, on_error, skip)
        bar.close()
        if on_error == "skip":
            result.report_path = Path(report_path) if report_path else Path(output) / "skipped.tsv"
            write_skip_report(result.report_path, result.skipped)
        result.manifest = writer.finish()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        writer.close()
    return result
