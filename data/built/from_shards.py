"""A built data set made from webdataset / img2dataset tar shards, which hold images and captions
together (data/images/shards.py reads them); the layout is layout.py's.

Input shard j (in the order the spec names them) goes whole to output shard j % num_shards (default:
one output shard per input shard), so the job that builds output shard i reads only its own input
shards: `--num-shards N --shard-index I` jobs need no coordinator and no shared queries file, and one
process without --shard-index builds the output shards in parallel, one per worker. Within a shard
the samples are read in order and their images decoded in a pool of processes (data/images/sources'
decode, as for the other sources); each caption of a sample is one pair with its image, and equal
captions share one token row. Pairs keep the input order, so the result does not depend on the
number of workers.

Bad samples (undecodable image, empty or missing caption, missing image, a key seen twice, a
truncated tar) stop the build naming the shard and the key (on_error "fail") or are counted per
reason in shard.json and the manifest and listed in the shard's skipped.tsv ("skip"). A shard is
marked done (shard.json) only after its arrays are written, and the data set (manifest.json) only
after every shard checks out; a killed job resumes, keeping the images it committed.
"""
from __future__ import annotations

import array
import json
import multiprocessing as mp
import sys
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from data.built.builder import _built_already, _encode_chunk, _save_arrays, _test_fault, finalize, shard_dir
from data.built.layout import BuildOptions, ShardResult, settings, vocab_fingerprint
from data.built.plan import tokenize_texts
from data.files import InputError, atomic_write
from data.images.shards import check_caption_from, expand_shards, iter_samples, key_image_id
from data.images.sources import BuildError, commit_decoded, in_order, write_skip_report
from data.images.store import FORMAT, JPEG_FORMAT, ImageStoreWriter
from data.images.transform import IMAGE_MEAN, IMAGE_STD


@dataclass
class _Pairs:
    """One output shard's pairs as its samples are read: (text row, image id) in input order."""
    text_index: Dict[str, int] = field(default_factory=dict)
    text: array.array = field(default_factory=lambda: array.array("q"))
    image: array.array = field(default_factory=lambda: array.array("q"))
    samples: int = 0
    hashed: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)
    bad: List[Tuple[object, str, str]] = field(default_factory=list)  # (id or key, where, reason) for skipped.tsv

    def skip(self, ident, where: str, reason: str, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.bad.append((ident, where, f"{reason}: {detail}" if detail != reason else reason))


def shard_inputs(urls: List[str], num_shards: int, index: int) -> List[str]:
    """The input shards output shard `index` is built from."""
    return [u for j, u in enumerate(urls) if j % num_shards == index]


def _chunks(opts: BuildOptions, inputs: List[str], existing: set, pairs: _Pairs, bar,
            size: int = 64) -> Iterator[list]:
    """The shard's samples read in order: their pairs noted in `pairs`, their images not yet in the
    store handed out in chunks for decoding."""
    fail = opts.on_error == "fail"
    seen: Dict[int, str] = {}
    chunk = []
    for url in inputs:
        for s in iter_samples(url, opts.caption_from):
            if s.reason != "truncated tar":
                pairs.samples += 1
            bar.update(1)
            if not s.error:
                image_id, hashed = key_image_id(s.key)
                if image_id in seen:
                    s.error, s.reason = f"image id {image_id} repeats {seen[image_id]}", "duplicate key"
            if s.error:
                if fail:
                    raise BuildError(f"{s.where}: {s.error} (--on-error skip counts and lists such samples)")
                pairs.skip(s.key, s.where, s.reason, s.error)
                continue
            seen[image_id] = s.where
            pairs.hashed += hashed
            for caption in s.captions:
                pairs.text.append(pairs.text_index.setdefault(caption, len(pairs.text_index)))
                pairs.image.append(image_id)
            if image_id not in existing:
                chunk.append((image_id, s.where, s.image, False, ""))
                if len(chunk) >= size:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def _write_images(opts: BuildOptions, writer: ImageStoreWriter, inputs: List[str], pairs: _Pairs, bar) -> None:
    def undecodable(image_id, where, reason):
        pairs.skip(image_id, where, "undecodable image", reason)

    def handle(decoded):
        commit_decoded(writer, decoded, opts.on_error, undecodable)
        _test_fault(writer)

    args = (opts.resolution, writer.resize, opts.image_format, opts.jpeg_quality)
    chunks = _chunks(opts, inputs, writer.existing_ids(), pairs, bar)
    if opts.workers <= 1:
        for decoded in in_order(None, _encode_chunk, chunks, 1, args):
            handle(decoded)
        return
    with mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(opts.workers) as pool:
        for decoded in in_order(pool, _encode_chunk, chunks, opts.workers, args):
            handle(decoded)


_TOKENS: Dict[str, np.ndarray] = {}  # text -> token row, kept across the shards one process builds
_TOKENS_KEY: Tuple = ()
TOKEN_CACHE_TEXTS = 1_000_000  # bound on the cache (~200 MB); past it, it starts afresh


def _token_rows(texts: List[str], opts: BuildOptions) -> np.ndarray:
    """Token rows of `texts`, tokenizing only those this process has not tokenized for an earlier
    shard (captions repeat across shards; a queries-file build tokenizes each distinct text once)."""
    global _TOKENS_KEY
    key = (str(opts.vocab), opts.context_length)
    if key != _TOKENS_KEY or len(_TOKENS) > TOKEN_CACHE_TEXTS:
        _TOKENS.clear()
        _TOKENS_KEY = key
    new = [t for t in dict.fromkeys(texts) if t not in _TOKENS]
    if new:
        _TOKENS.update(zip(new, tokenize_texts(new, opts.vocab, opts.context_length, opts.workers, False)))
    if not texts:
        return np.zeros((0, opts.context_length), dtype=np.int32)
    return np.stack([_TOKENS[t] for t in texts])


def build_shard_from_tars(opts: BuildOptions, urls: List[str], index: int, num_shards: int) -> ShardResult:
    """Build (or resume, or find already built) output shard `index` from its input shards."""
    sdir = shard_dir(opts.output, index)
    want = settings(opts, num_shards)
    done = _built_already(sdir, want, index)
    if done is not None:
        return done
    inputs = shard_inputs(urls, num_shards, index)
    pairs = _Pairs()
    writer = ImageStoreWriter(sdir / "images", opts.resolution, source=str(opts.images), mean=IMAGE_MEAN,
                              std=IMAGE_STD, fmt=JPEG_FORMAT if opts.image_format == "jpeg" else FORMAT,
                              resize=want["resize"])
    try:
        with tqdm(unit="sample", desc=f"shard {index}/{num_shards} ({len(inputs)} tar)", file=sys.stderr,
                  disable=not opts.progress, dynamic_ncols=True, mininterval=2.0) as bar:
            _write_images(opts, writer, inputs, pairs, bar)
        present = np.asarray(sorted(writer.existing_ids()), dtype=np.int64)
        pair_image = np.frombuffer(pairs.image, dtype=np.int64)
        if not np.isin(present, pair_image).all():
            raise InputError(f"{sdir / 'images'}: holds images that this shard's samples do not name (another "
                             f"build's output?); choose another --output")
        writer.finish()
    finally:
        writer.close()
    keep = np.isin(pair_image, present)
    utext, pair_text = np.unique(np.frombuffer(pairs.text, dtype=np.int64)[keep], return_inverse=True)
    texts = list(pairs.text_index)
    tokens = _token_rows([texts[t] for t in utext], opts)
    wide = vocab_fingerprint(opts.vocab)["vocab_size"] > 65536
    _save_arrays(sdir, {"image_ids": present,
                        "pair_image": np.searchsorted(present, pair_image[keep]).astype(np.int32),
                        "pair_text": pair_text.astype(np.int32).reshape(-1),
                        "tokens": tokens.astype(np.int32 if wide else np.uint16)})
    res = ShardResult(index, int(present.size), int(keep.sum()), int(utext.size), int(keep.size - keep.sum()))
    if opts.on_error == "skip":
        write_skip_report(sdir / "skipped.tsv", pairs.bad)
    with atomic_write(sdir / "shard.json") as f:
        json.dump({"index": index, "settings": want, "images": res.images, "pairs": res.pairs, "texts": res.texts,
                   "skipped_pairs": res.skipped_pairs, "samples": pairs.samples, "skipped_samples": pairs.skipped,
                   "hashed_ids": pairs.hashed, "inputs": inputs}, f, indent=1)
    res.bad_images = pairs.bad
    return res


def _one_shard(args) -> ShardResult:
    opts, urls, index, num_shards = args
    return build_shard_from_tars(opts, urls, index, num_shards)


def _build_all(opts: BuildOptions, urls: List[str], num_shards: int) -> List[ShardResult]:
    """Every output shard: one after another with a decoding pool, or with several workers and
    several shards, one shard per worker process (each reads, decodes and writes its own)."""
    if opts.workers <= 1 or num_shards == 1:
        return [build_shard_from_tars(opts, urls, s, num_shards) for s in range(num_shards)]
    solo = replace(opts, workers=1, progress=False)
    results: List[Optional[ShardResult]] = [None] * num_shards
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(min(opts.workers, num_shards)) as pool, \
            tqdm(total=num_shards, unit="shard", desc="build", file=sys.stderr, disable=not opts.progress,
                 dynamic_ncols=True) as bar:
        for r in pool.imap_unordered(_one_shard, [(solo, urls, s, num_shards) for s in range(num_shards)]):
            results[r.index] = r
            bar.update(1)
    return results


def build_dataset_from_shards(opts: BuildOptions, shard_index: Optional[int] = None,
                              finalize_only: bool = False) -> Tuple[List[ShardResult], Optional[Dict]]:
    """Every output shard then the manifest (shard_index None), one output shard (a cluster job),
    or only the final step."""
    check_caption_from(opts.caption_from)
    urls = expand_shards(str(opts.images))
    num_shards = opts.num_shards or len(urls)
    if num_shards > len(urls):
        raise InputError(f"--num-shards {num_shards} is more than the {len(urls)} input shard(s) of --images "
                         f"{opts.images}: every output shard is built from whole input shards")
    if finalize_only:
        return [], finalize(opts, num_shards)
    if shard_index is not None:
        if not 0 <= shard_index < num_shards:
            raise InputError(f"--shard-index {shard_index} is outside 0..{num_shards - 1}")
        return [build_shard_from_tars(opts, urls, shard_index, num_shards)], None
    return _build_all(opts, urls, num_shards), finalize(opts, num_shards)
