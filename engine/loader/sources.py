"""Open the run's training and validation data: a built data set (a folder from
launch/build_dataset.py), a weighted mixture of them (mixture.py), or a queries jsonl (MUGE's or
Chinese-CLIP's schema, data/queries.py) + image LMDB of launch/build_lmdb.py.

Validation keeps the jsonl + LMDB form: it scores whole queries (a query with all its correct item
ids) against the full image pool, and validation splits are small (MUGE: 5k queries, 30k images), so
their start-up cost does not grow with the training data. A built data set stores pairs, not queries.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from data.built.reader import BuiltDataset, check_tokenizer, is_built_dataset, read_manifest
from data.files import InputError
from data.images.datasets import PairDataset
from data.images.store import ImageStore
from data.queries import check_ids_present, describe_schema, read_queries, training_pairs
from engine import dist
from engine.loader.jpeg_gpu import DeviceJpegDecoder
from engine.loader.mixture import MixtureDataset

log = logging.getLogger("clip")


@dataclass
class TrainData:
    dataset: Any         # map-style Dataset of {"image": uint8 [3,R,R], "input_ids": long [L]}
    images: Any          # what holds the images: .resolution, .mean, .std
    images_flag: str     # how the user named them, for messages ("--train-img X" / "--train-data DIR")


def check_data_flags(train_data: str, train_img: Optional[str], val_data: Optional[str], vocab: str,
                     context_length: int) -> None:
    """Config-time checks (before any process group): the data flags fit together, and a built data
    set was tokenized with this run's vocab and context length."""
    if is_built_dataset(train_data):
        if train_img:
            raise InputError(f"--train-data {train_data} is a built data set (it holds its images); "
                             f"drop --train-img")
        check_tokenizer(train_data, read_manifest(train_data), vocab, context_length)
    elif not Path(train_data).is_file():
        raise InputError(f"--train-data {train_data}: file not found")
    elif not train_img:
        raise InputError(f"--train-data {train_data} is a queries jsonl: give its images with --train-img "
                         f"(or build a data set with launch/build_dataset.py and pass its folder)")
    if val_data and is_built_dataset(val_data):
        raise InputError(f"--val-data {val_data}: validation takes a queries jsonl with --val-img (it scores "
                         f"whole queries against the full image pool; a built data set holds pairs)")


def _gpu_jpeg(dataset: BuiltDataset, num_workers: int) -> None:
    """On a GPU, decode a JPEG data set's batches there (nvjpeg) when reading in this process."""
    if dataset.image_format != "jpeg" or not torch.cuda.is_available() or num_workers > 0:
        return
    dataset.image_decoder = DeviceJpegDecoder(dist.device(), dataset.resolution)
    log.info("train: JPEG images decoded on %s", dist.device())


def _check_resolution(flag: str, resolution: int, cfg, want: int) -> None:
    if resolution != want:
        raise InputError(f"{flag} holds {resolution} px images but --model {cfg.model} expects {want} px; "
                         f"rebuild the images with --resolution {want}")


def open_training_data(cfg, tokenizer, want_resolution: int) -> TrainData:
    """The training pairs; the images' resolution is checked against the model's before anything
    large is read (the queries jsonl of the old path can be big)."""
    if cfg.train_mixture:
        dataset = MixtureDataset(cfg.train_mixture)
        _check_resolution(f"--train-data {cfg.train_mixture[0][0]}", dataset.resolution, cfg, want_resolution)
        _gpu_jpeg(dataset, cfg.num_workers)
        log.info("train: a mixture of %d built data sets, %d pairs", len(dataset.parts), len(dataset))
        return TrainData(dataset, dataset, f"--train-data {cfg.train_data}")
    if is_built_dataset(cfg.train_data):
        dataset = BuiltDataset(cfg.train_data)
        _check_resolution(f"--train-data {cfg.train_data}", dataset.resolution, cfg, want_resolution)
        _gpu_jpeg(dataset, cfg.num_workers)
        log.info("train: %d pairs in %d shard(s) of %s (%s, %d px, built data set)", len(dataset),
                 len(dataset.shard_pair_counts), cfg.train_data, dataset.image_format, dataset.resolution)
        return TrainData(dataset, dataset, f"--train-data {cfg.train_data}")
    store = ImageStore(cfg.train_img)
    _check_resolution(f"--train-img {cfg.train_img}", store.resolution, cfg, want_resolution)
    queries = read_queries(cfg.train_data)
    log.info("train: %s", describe_schema(cfg.train_data, queries.schema))
    check_ids_present(queries, store, cfg.train_data)
    pairs = training_pairs(queries)
    dataset = PairDataset(pairs, store, tokenizer, cfg.context_length)
    log.info("train: %d pairs from %s, images %s (%d px)", len(pairs), cfg.train_data, cfg.train_img,
             store.resolution)
    return TrainData(dataset, store, f"--train-img {cfg.train_img}")


def open_validation_data(cfg, want_resolution: int) -> Optional[Tuple[Any, list]]:
    """(image store, queries) of the validation split, or None without --val-data."""
    if not cfg.val_data:
        return None
    store = ImageStore(cfg.val_img)
    _check_resolution(f"--val-img {cfg.val_img}", store.resolution, cfg, want_resolution)
    queries = read_queries(cfg.val_data)
    log.info("validation: %s", describe_schema(cfg.val_data, queries.schema))
    check_ids_present(queries, store, cfg.val_data)
    return store, queries
