"""Training on a weighted mixture of built data sets: `--train-data A --train-data B
--train-data-weights 1,3` (or `--train-data A::1 --train-data B::3`).

The data sets are read as one concatenation (MixtureDataset) and sampled by data.sampler's
MixtureSampler, a pure function of (seed, epoch, rank, world size, offset, sizes, weights): an epoch
is as many samples as the data sets hold together, each source's share of it is its weight's, and a
resume continues the exact sample sequence (the sizes and weights are part of what a checkpoint
records, engine/run/resume.py). Data sets that were tokenized with other vocabularies or context
lengths, or hold images of another resolution, normalisation or resize mode, cannot share a batch:
they are refused naming both. SourceShares counts the source of every sample the step consumed and
gives each source's share of them since the last log line (summed over the ranks) to TensorBoard.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data.built.reader import BuiltDataset, check_tokenizer, is_built_dataset, read_manifest
from data.files import InputError
from data.sampler import MixtureSampler
from engine import dist

WEIGHT_SEP = "::"


def parse_train_data(values: Sequence[str], weights: Optional[str]) -> List[Tuple[str, float]]:
    """(path, weight) per --train-data; weights from --train-data-weights or each value's DIR::weight
    form (default 1)."""
    values = [values] if isinstance(values, str) else list(values)
    out = []
    for v in values:
        path, sep, w = v.rpartition(WEIGHT_SEP)
        out.append((path, _weight(w, f"--train-data {v}")) if sep else (v, None))
    given = [w for _, w in out if w is not None]
    if weights is not None:
        if given:
            raise InputError("give the mixture weights either with --train-data-weights or as DIR::weight, not both")
        parts = weights.split(",")
        if len(parts) != len(out):
            raise InputError(f"--train-data-weights {weights}: {len(parts)} weight(s) for {len(out)} --train-data")
        return [(p, _weight(w, f"--train-data-weights {weights}")) for (p, _), w in zip(out, parts)]
    if given and len(given) != len(out):
        raise InputError("give a ::weight to every --train-data of a mixture, or to none (equal weights)")
    return [(p, 1.0 if w is None else w) for p, w in out]


def _weight(text: str, flag: str) -> float:
    try:
        w = float(text)
    except ValueError:
        w = math.nan
    if not (w > 0 and math.isfinite(w)):
        raise InputError(f"{flag}: a mixture weight must be a positive number, got {text!r}")
    return w


def _same(what: str, a: Tuple[str, object], b: Tuple[str, object]) -> None:
    if a[1] != b[1]:
        raise InputError(f"cannot mix --train-data {a[0]} ({what} {a[1]}) with --train-data {b[0]} ({what} {b[1]}): "
                         f"rebuild one of them with the other's settings (launch/build_dataset.py)")


def check_mixture(sources: Sequence[Tuple[str, float]], vocab: str, context_length: int) -> None:
    """Config-time checks: every source is a finished built data set tokenized as this run asks,
    and all of them can share a batch."""
    manifests = []
    for path, _ in sources:
        if not is_built_dataset(path):
            raise InputError(f"--train-data {path}: a mixture takes built data sets (launch/build_dataset.py "
                             f"folders), not a queries file")
        manifests.append((path, read_manifest(path)))
    first_path, first = manifests[0]
    for path, m in manifests[1:]:
        _same("tokenizer vocab sha256", (first_path, first["tokenizer"]["vocab_sha256"][:12]),
              (path, m["tokenizer"]["vocab_sha256"][:12]))
        for key in ("context_length", "resolution", "mean", "std"):
            _same(key.replace("_", " "), (first_path, first[key]), (path, m[key]))
        _same("resize", (first_path, first["preprocessing"]["resize"]), (path, m["preprocessing"]["resize"]))
    for path, m in manifests:
        check_tokenizer(path, m, vocab, context_length)
    if len({str(Path(p).resolve()) for p, _ in sources}) != len(sources):
        raise InputError("a data set is named twice in the mixture: give it once with the summed weight")


class MixtureDataset(torch.utils.data.Dataset):
    """Built data sets read as one: index i < size_0 is data set 0's, and so on."""

    def __init__(self, sources: Sequence[Tuple[str, float]]):
        self.parts = [BuiltDataset(p) for p, _ in sources]
        self.names = [f"{k}_{Path(p).name}" for k, (p, _) in enumerate(sources)]  # unique TensorBoard tags
        self.weights = [float(w) for _, w in sources]
        self.sizes = [len(d) for d in self.parts]
        self._ends = np.cumsum(self.sizes)
        first = self.parts[0]
        self.resolution, self.mean, self.std, self.resize = first.resolution, first.mean, first.std, first.resize
        self.context_length = first.context_length
        self.image_format = "jpeg" if any(d.image_format == "jpeg" for d in self.parts) else "uint8"
        empty = [str(d.path) for d in self.parts if len(d) == 0]
        if empty:
            raise InputError(f"--train-data {empty[0]}: holds no pairs")

    @property
    def image_decoder(self):
        return self.parts[0].image_decoder

    @image_decoder.setter
    def image_decoder(self, decoder) -> None:  # JPEG parts decode on the GPU; uint8 parts ignore it
        for d in self.parts:
            if d.image_decoder is None and d.image_format == "jpeg":
                d.image_decoder = decoder

    def record(self) -> List[List]:
        """What a checkpoint keeps of the mixture: [pairs, weight] per source."""
        return [[n, w] for n, w in zip(self.sizes, self.weights)]

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: List[int]):
        idx = np.asarray(indices, dtype=np.int64)
        src = np.searchsorted(self._ends, idx, side="right")
        out: List = [None] * len(indices)
        for k in np.unique(src).tolist():
            at = np.nonzero(src == k)[0]
            base = int(self._ends[k] - self.sizes[k])
            for j, item in zip(at.tolist(), self.parts[k].__getitems__((idx[at] - base).tolist())):
                out[j] = item
        return out


def mixture_record(dataset) -> List[List]:
    """The checkpoint's record of a mixture; [] for one data set."""
    return dataset.record() if isinstance(dataset, MixtureDataset) else []


class SourceShares:
    """Each source's share of the samples the steps consumed since the last log line, over all ranks.
    DeviceBatches reports every micro-batch it hands to the step (`consumed`); `scalars()` is a
    collective (every rank calls it at the log step) and returns {} for a single data set."""

    def __init__(self, dataset, sampler):
        self.sampler = sampler
        self.names = dataset.names if isinstance(dataset, MixtureDataset) else []
        self.counts = np.zeros(len(self.names), dtype=np.int64)

    def consumed(self, epoch: int, begin: int, end: int) -> None:
        """This rank's samples begin..end-1 of `epoch` went into a step."""
        if self.names:
            src = self.sampler.source_of(self.sampler.indices(begin, end, epoch))
            self.counts += np.bincount(src, minlength=len(self.names))

    def scalars(self) -> Dict[str, float]:
        if not self.names:
            return {}
        total = dist.all_reduce_sum(torch.tensor(self.counts, device=dist.device())).cpu().numpy()
        self.counts = np.zeros_like(self.counts)
        n = max(1, int(total.sum()))
        return {f"data/share/{name}": float(c) / n for name, c in zip(self.names, total)}


def mixture_sampler(dataset: MixtureDataset, rank: int, world_size: int, seed: int) -> MixtureSampler:
    return MixtureSampler(dataset.sizes, dataset.weights, rank, world_size, seed=seed)
