"""What a built data set is on disk, and the settings every shard of one must share. The queries read
into pair arrays and their tokenizing: plan.py; the shards themselves: builder.py; reading: reader.py.

A built data set is made from a queries file (MUGE's or Chinese-CLIP's) and an image source
(builder.py), or from webdataset / img2dataset tar shards that hold both (from_shards.py).

Layout of the output folder:
  shards/00000/images/          an ImageStore (LMDB) of the shard's images, uint8 or JPEG
  shards/00000/image_ids.npy    int64 [I]: the shard's image ids, sorted (row -> LMDB key)
  shards/00000/pair_image.npy   int32 [P]: image row of each pair (pairs in queries-file order)
  shards/00000/pair_text.npy    int32 [P]: token row of each pair
  shards/00000/tokens.npy       uint16 (int32 for a vocab over 65535) [T, L]: the shard's distinct texts
  shards/00000/shard.json       written last: counts and the build settings (the shard's "done")
  manifest.json                 written by the final step once every shard checks out (complete: true)
From a queries file, an image goes to shard hash(image id) % num_shards, and a pair to its image's
shard, so every shard holds its images and every pair that uses them: a node can train from the
shards on its own disk. From tar shards, input shard j goes to output shard j % num_shards, whole.

Every shard builds on its own (`build_shard`: one process, node or cluster job each), from the same
queries file and image source; `finalize` checks them all and writes the manifest. Images are
committed to the LMDB in chunks (ImageStoreWriter), so a killed shard build resumes where it stopped;
the arrays are written whole (atomically) after the images, and shard.json after them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from data.files import InputError
from data.images.store import MANIFEST_KEY, ImageStore
from data.tokenizer import vocab_file

DATASET_FORMAT = "clip-built-pairs-v1"
MANIFEST = "manifest.json"
SHARD_DONE = "shard.json"
ARRAYS = ("image_ids", "pair_image", "pair_text", "tokens")
DEFAULT_SHARD_SIZE = 200_000  # images per shard: 30 GB of uint8 at 224 px


@dataclass
class BuildOptions:
    queries: Optional[Path]  # None: the captions come from tar shards (--images is a shard spec)
    images: Union[Path, str]  # a str for a shard spec (Path() would mangle a URL)
    output: Path
    vocab: Path
    context_length: int
    resolution: int
    shard_size: int = DEFAULT_SHARD_SIZE
    num_shards: Optional[int] = None
    workers: int = 1
    on_error: str = "fail"
    image_format: str = "uint8"
    jpeg_quality: int = 95
    progress: bool = True
    resize: str = "squash"  # how a tsv/folder image becomes R×R (data.images.transform); a store keeps its own
    caption_from: str = "txt"  # tar shards: each sample's .txt, or json:FIELD of its .json


@dataclass
class ShardResult:
    index: int
    images: int = 0
    pairs: int = 0
    texts: int = 0
    skipped_pairs: int = 0
    missing_images: List[int] = field(default_factory=list)
    bad_images: List[Tuple[int, str, str]] = field(default_factory=list)
    already_built: bool = False


# ---- settings every shard must share ---------------------------------------------------------

def vocab_fingerprint(vocab) -> Dict:
    """sha256 and line count of the vocab file: the tokenizer identity a run is checked against."""
    path = vocab_file(vocab)
    if not path.is_file():
        raise InputError(f"{vocab}: no vocab.txt found")
    data = path.read_bytes()
    return {"vocab_sha256": hashlib.sha256(data).hexdigest(), "vocab_size": len(data.decode("utf-8").splitlines()),
            "vocab_file": str(path)}


def shard_of(image_ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard of each image id: a 64-bit mix of the id (ids are often sequential) modulo num_shards."""
    x = np.asarray(image_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xFF51AFD7ED558CCD)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> np.uint64(33)
    return (x % np.uint64(num_shards)).astype(np.int64)


def our_store(path: Path) -> Optional[ImageStore]:
    """The image source as one of our stores (launch/build_lmdb.py), or None for other sources.
    The caller closes it."""
    if not (path.is_dir() and (path / "data.mdb").is_file()):
        return None
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            ours = txn.get(MANIFEST_KEY) is not None
    finally:
        env.close()
    return ImageStore(path) if ours else None


def source_resize(opts: BuildOptions) -> str:
    """The resize mode of the data set's images: --resize for images decoded here; a store built by
    launch/build_lmdb.py already holds R×R images, made by the mode its manifest records (stores
    from before the key existed were centre-cropped)."""
    store = None if opts.queries is None else our_store(Path(opts.images))
    if store is None:
        return opts.resize
    store.close()  # py-lmdb allows one open environment per path and process
    return store.manifest.get("resize") or "center-crop"


def settings(opts: BuildOptions, num_shards: int) -> Dict:
    """What makes two shards parts of one data set; recorded in every shard.json and the manifest."""
    out = {"num_shards": num_shards, "resolution": opts.resolution, "context_length": opts.context_length,
           "image_format": opts.image_format,
           "jpeg_quality": opts.jpeg_quality if opts.image_format == "jpeg" else None,
           "resize": source_resize(opts), "on_error": opts.on_error,
           "vocab_sha256": vocab_fingerprint(opts.vocab)["vocab_sha256"]}
    if opts.queries is None:  # tar shards: the spec names every input shard (which job reads which follows)
        return {**out, "shards": str(opts.images), "caption_from": opts.caption_from}
    q = Path(opts.queries)
    return {**out, "queries": {"name": q.name, "bytes": q.stat().st_size}, "images": Path(opts.images).name}
