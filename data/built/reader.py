"""Read a built data set (launch/build_dataset.py; layout in data/built/layout.py) as a map-style Dataset.

Opening reads manifest.json only; each shard's arrays are memory-mapped and its LMDB opened the first
time an index of that shard is read, in the process that reads it. Nothing is held per sample, so the
memory of a rank does not grow with the number of pairs (beyond the page cache of what it reads).
Dataset index order: shard 0's pairs, then shard 1's, ... (`shard_pair_counts`), for samplers that
keep a rank on its own shards.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from data.built.layout import DATASET_FORMAT, MANIFEST, vocab_fingerprint
from data.files import InputError, read_json_object
from data.images.store import ImageStore

PathLike = Union[str, os.PathLike]


def is_built_dataset(path: PathLike) -> bool:
    """A folder (a built data set, finished or not) rather than a queries jsonl."""
    return Path(path).is_dir()


def read_manifest(path: PathLike) -> Dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        if (path / "shards").is_dir():
            raise InputError(f"{path}: the build of this data set is not finished (no {MANIFEST}); run "
                             f"launch/build_dataset.py again without --shard-index (or with --finalize)")
        raise InputError(f"{path}: not a built data set (no {MANIFEST}); build one with "
                         f"launch/build_dataset.py, or pass a queries jsonl with --train-img")
    manifest = read_json_object(path / MANIFEST)
    if manifest.get("format") != DATASET_FORMAT:
        raise InputError(f"{path / MANIFEST}: unknown data set format {manifest.get('format')!r}")
    if manifest.get("complete") is not True:
        raise InputError(f"{path / MANIFEST}: the data set is not marked complete")
    return manifest


def check_tokenizer(path: PathLike, manifest: Dict, vocab: PathLike, context_length: int) -> None:
    """Refuse a data set tokenized with another vocabulary or context length than this run's."""
    built = manifest["tokenizer"]
    ours = vocab_fingerprint(vocab)
    if built["vocab_sha256"] == ours["vocab_sha256"] and manifest["context_length"] == context_length:
        return
    raise InputError(
        f"{Path(path) / MANIFEST} was tokenized with context length {manifest['context_length']} and vocab "
        f"{built['vocab_file']} (sha256 {built['vocab_sha256'][:12]}, {built['vocab_size']} tokens); this run "
        f"has --context-length {context_length} and --vocab {ours['vocab_file']} (sha256 "
        f"{ours['vocab_sha256'][:12]}, {ours['vocab_size']} tokens): rebuild the data set with this run's "
        f"--vocab and --context-length, or train with the ones it was built with")


class _Shard:
    """One shard's arrays (memory-mapped) and image store, opened in the process that reads them."""

    def __init__(self, path: Path):
        def load(name):
            return np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)

        self.image_ids, self.pair_image = load("image_ids"), load("pair_image")
        self.pair_text, self.tokens = load("pair_text"), load("tokens")
        self.store = ImageStore(path / "images")


class BuiltDataset(Dataset):
    """Pairs of a built data set -> {"image": uint8 [3,R,R], "input_ids": long [L]}.

    `image_decoder` (set by the engine for a JPEG set on a GPU) takes the stored JPEG bytes of a batch
    and returns uint8 [B,3,R,R] on its device; without it images are read (and JPEG-decoded in CPU
    threads) by the shard's ImageStore."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.resolution = int(m["resolution"])
        self.mean, self.std = tuple(m["mean"]), tuple(m["std"])
        self.resize = m["preprocessing"]["resize"]  # recorded in exported models (engine.run.export)
        self.context_length = int(m["context_length"])
        self.image_format = m["image_format"]
        self.shard_pair_counts: List[int] = [int(s["pairs"]) for s in m["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(self.shard_pair_counts, dtype=np.int64)])
        self._shard_paths = [self.path / s["path"] for s in m["shards"]]
        self._shards: Dict[int, _Shard] = {}
        self._pid = os.getpid()
        self.image_decoder: Optional[Callable] = None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self):  # spawned DataLoader workers map the files themselves
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state

    def _shard(self, s: int) -> _Shard:
        if self._pid != os.getpid():  # forked: LMDB handles must not cross a fork
            self._shards, self._pid = {}, os.getpid()
        shard = self._shards.get(s)
        if shard is None:
            shard = self._shards[s] = _Shard(self._shard_paths[s])
        return shard

    def locate(self, indices: Sequence[int]):
        """(shard, row within the shard) of each dataset index."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} pairs")
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        return shard, idx - self._offsets[shard]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: List[int]) -> List[Dict[str, torch.Tensor]]:
        shard_of, rows = self.locate(indices)
        n, r = len(indices), self.resolution
        images = np.empty((n, 3, r, r), dtype=np.uint8) if self.image_decoder is None else None
        blobs: List[bytes] = [b""] * n
        ids = np.empty((n, self.context_length), dtype=np.int64)
        for s in np.unique(shard_of):
            at = np.nonzero(shard_of == s)[0]
            sh = self._shard(int(s))
            local = rows[at]
            image_ids = sh.image_ids[sh.pair_image[local]].tolist()
            if images is None:
                for k, blob in zip(at.tolist(), sh.store.get_encoded(image_ids)):
                    blobs[k] = blob
            elif at.size == n:
                sh.store.get_many(image_ids, out=images)
            else:
                images[at] = sh.store.get_many(image_ids)
            ids[at] = sh.tokens[sh.pair_text[local]]
        pixels = torch.from_numpy(images) if images is not None else self.image_decoder(blobs)
        input_ids = torch.from_numpy(ids)
        return [{"image": pixels[k], "input_ids": input_ids[k]} for k in range(n)]

    def __repr__(self) -> str:
        return (f"BuiltDataset({str(self.path)!r}, pairs={len(self)}, shards={len(self.shard_pair_counts)}, "
                f"{self.image_format} {self.resolution}px)")
