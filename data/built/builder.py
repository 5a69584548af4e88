"""Build the shards of a built data set and finalize it (the layout: data/built/layout.py).

Each shard: images (read and decoded by data/images/sources.py, in a pool of processes) committed to
its LMDB chunk by chunk, so a killed build resumes where it stopped; then its pair arrays, written
whole and atomically; then shard.json, its mark of completion. `finalize` checks every shard and
writes manifest.json (complete: true) last.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from data.built.layout import (DATASET_FORMAT, MANIFEST, SHARD_DONE, BuildOptions, ShardResult, our_store,
                               settings, shard_of, vocab_fingerprint)
from data.built.plan import Plan, num_shards_for, read_plan, tokenize_texts
from data.files import InputError, atomic_path, atomic_write, read_json_object
from data.images.jpeg import encode_jpeg
from data.images.shards import KEY_HASH
from data.images.sources import (BuildError, commit_decoded, decode_chunk, in_order, open_source,
                                 write_skip_report)
from data.images.store import FORMAT, JPEG_FORMAT, ImageStore, ImageStoreWriter
from data.images.transform import IMAGE_MEAN, IMAGE_STD


# ---- one shard -------------------------------------------------------------------------------

def shard_dir(output, index: int) -> Path:
    return Path(output) / "shards" / f"{index:05d}"


def _encode_chunk(args):
    """Source records -> [(id, where, stored bytes or None, error)]: data.images.sources' decode and
    preprocessing, then JPEG encoding of the R×R result for a JPEG data set."""
    items, resolution, resize, image_format, quality = args
    out = decode_chunk((items, resolution, resize))
    if image_format != "jpeg":
        return out
    shape = (3, resolution, resolution)
    return [(i, w, None if a is None else encode_jpeg(np.frombuffer(a, np.uint8).reshape(shape), quality), e)
            for i, w, a, e in out]


def _source_chunks(opts: BuildOptions, todo: set, res: ShardResult, size: int = 64) -> Iterator[list]:
    """The source's records for the ids in `todo`, in chunks (data.images.sources' record format)."""
    _, records, _, _ = open_source(opts.images)
    seen: set = set()
    chunk = []
    for rec in records:
        if rec.image_id is None:  # a line whose id cannot be read: it may be any shard's image
            if opts.on_error == "fail":
                raise BuildError(f"{rec.where}: {rec.error}")
            continue
        if rec.image_id not in todo:
            continue
        if rec.image_id in seen:
            if opts.on_error == "fail":
                raise BuildError(f"{rec.where}: duplicate image id {rec.image_id}")
            res.bad_images.append((rec.image_id, rec.where, "duplicate image id (the first one is kept)"))
            continue
        seen.add(rec.image_id)
        chunk.append((rec.image_id, rec.where, b"" if rec.error else rec.payload, rec.is_base64, rec.error))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _test_fault(writer: ImageStoreWriter) -> None:
    """Test hook: CLIP_TEST_KILL_AFTER_IMAGES=N kills this process (SIGKILL, like a lost node) once
    the shard being built holds N images, to test that a killed build resumes."""
    at = os.environ.get("CLIP_TEST_KILL_AFTER_IMAGES")
    if at and len(writer.existing_ids()) >= int(at):
        os.kill(os.getpid(), signal.SIGKILL)


def _write_images(opts: BuildOptions, writer: ImageStoreWriter, store: Optional[ImageStore], todo: set,
                  res: ShardResult, bar) -> None:
    """Decode (in a pool of processes) and commit the images of `todo` chunk by chunk."""
    def handle(decoded):
        bar.update(commit_decoded(writer, decoded, opts.on_error, lambda *bad: res.bad_images.append(bad)))
        _test_fault(writer)

    if store is not None:  # one of our stores: copy its uint8 images (JPEG-encoded for a JPEG set)
        ids = sorted(todo)
        for i in range(0, len(ids), 256):
            part = [x for x in ids[i:i + 256] if x in store]
            arrs = store.get_many(part)
            if opts.image_format == "jpeg":
                handle([(x, str(store.path), encode_jpeg(a, opts.jpeg_quality), "") for x, a in zip(part, arrs)])
            else:
                handle([(x, str(store.path), a.tobytes(), "") for x, a in zip(part, arrs)])
        return
    workers = max(1, opts.workers)
    args = (opts.resolution, writer.resize, opts.image_format, opts.jpeg_quality)
    chunks = _source_chunks(opts, todo, res)
    if workers == 1:
        for decoded in in_order(None, _encode_chunk, chunks, workers, args):
            handle(decoded)
        return
    with mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers) as pool:
        for decoded in in_order(pool, _encode_chunk, chunks, workers, args):
            handle(decoded)


def _missing_error(opts: BuildOptions, plan: Plan, sel: np.ndarray, missing: np.ndarray, index: int):
    """InputError naming the first pair (in file order) whose image the source lacks."""
    k = sel[np.isin(plan.pair_image[sel], missing)][0]
    q = plan.pair_query[k]
    return InputError(f"{opts.queries}:{plan.query_lines[q]}: query {plan.query_ids[q]}: image id "
                      f"{plan.pair_image[k]} is not in {opts.images} ({missing.size} image id(s) of shard "
                      f"{index} missing or unreadable; --on-error skip drops their pairs and counts them)")


def _save_arrays(sdir: Path, arrays: Dict[str, np.ndarray]) -> None:
    for name, arr in arrays.items():
        with atomic_path(sdir / f"{name}.npy") as tmp:
            np.save(tmp, arr)


def _built_already(sdir: Path, want: Dict, index: int) -> Optional[ShardResult]:
    """The shard's result when a build with the same settings finished it; refused when other
    settings built it."""
    if not (sdir / SHARD_DONE).is_file():
        return None
    old = read_json_object(sdir / SHARD_DONE)
    if old.get("settings") != want:
        raise InputError(f"{sdir / SHARD_DONE}: this shard was built with other settings "
                         f"({old.get('settings')}); choose another --output")
    return ShardResult(index, old["images"], old["pairs"], old["texts"], old["skipped_pairs"], already_built=True)


def _shard_images(opts: BuildOptions, plan: Plan, sel: np.ndarray, index: int, num_shards: int, want: Dict,
                  res: ShardResult) -> Tuple[np.ndarray, np.ndarray]:
    """Commit the images the shard's pairs use; (image ids present, image ids missing)."""
    sdir = shard_dir(opts.output, index)
    needed = np.unique(plan.pair_image[sel])
    store = our_store(Path(opts.images))
    if store is not None and store.resolution != opts.resolution:
        raise InputError(f"{opts.images}: holds {store.resolution} px images, not --resolution {opts.resolution}")
    mean, std = (store.mean, store.std) if store is not None else (IMAGE_MEAN, IMAGE_STD)
    try:
        writer = ImageStoreWriter(sdir / "images", opts.resolution, source=str(Path(opts.images).resolve()),
                                  mean=mean, std=std, fmt=JPEG_FORMAT if opts.image_format == "jpeg" else FORMAT,
                                  resize=want["resize"])
    except BaseException:
        if store is not None:
            store.close()
        raise
    try:
        todo = set(needed.tolist()) - writer.existing_ids()
        with tqdm(total=needed.size, initial=needed.size - len(todo), unit="img", file=sys.stderr,
                  desc=f"shard {index}/{num_shards}", disable=not opts.progress, dynamic_ncols=True) as bar:
            _write_images(opts, writer, store, todo, res, bar)
        present = np.asarray(sorted(writer.existing_ids()), dtype=np.int64)
        missing = needed[~np.isin(needed, present)]
        if missing.size and opts.on_error == "fail":
            raise _missing_error(opts, plan, sel, missing, index)
        if present.size != needed.size - missing.size:
            raise InputError(f"{sdir / 'images'}: holds images that this shard does not use (another "
                             f"build's output?); choose another --output")
        writer.finish()
    finally:
        writer.close()
        if store is not None:
            store.close()
    return present, missing


def build_shard(opts: BuildOptions, plan: Plan, index: int, num_shards: int,
                tokens_all: Optional[np.ndarray] = None, assign: Optional[np.ndarray] = None) -> ShardResult:
    """Build (or resume, or find already built) shard `index` of `num_shards`. `tokens_all` (token
    rows of every text) and `assign` (shard of every pair) save work when one process builds many."""
    sdir = shard_dir(opts.output, index)
    want = settings(opts, num_shards)
    done = _built_already(sdir, want, index)
    if done is not None:
        return done
    res = ShardResult(index)
    sel = np.nonzero((shard_of(plan.pair_image, num_shards) if assign is None else assign) == index)[0]
    present, missing = _shard_images(opts, plan, sel, index, num_shards, want, res)
    keep = sel[np.isin(plan.pair_image[sel], present)]
    res.missing_images = sorted(set(missing.tolist()) - {b[0] for b in res.bad_images})
    res.skipped_pairs, res.images, res.pairs = int(sel.size - keep.size), int(present.size), int(keep.size)
    utext, pair_text = np.unique(plan.query_text[plan.pair_query[keep]], return_inverse=True)
    if tokens_all is not None:
        tokens = tokens_all[utext]
    else:
        tokens = tokenize_texts([plan.texts[t] for t in utext], opts.vocab, opts.context_length,
                                opts.workers, opts.progress)
    res.texts = int(utext.size)
    wide = vocab_fingerprint(opts.vocab)["vocab_size"] > 65536
    _save_arrays(sdir, {"image_ids": present,
                        "pair_image": np.searchsorted(present, plan.pair_image[keep]).astype(np.int32),
                        "pair_text": pair_text.astype(np.int32).reshape(-1),
                        "tokens": tokens.astype(np.int32 if wide else np.uint16)})
    if opts.on_error == "skip":
        write_skip_report(sdir / "skipped.tsv", [(i, str(opts.images), "not in the image source")
                                                 for i in res.missing_images] + res.bad_images)
    with atomic_write(sdir / SHARD_DONE) as f:
        json.dump({"index": index, "settings": want, "images": res.images, "pairs": res.pairs,
                   "texts": res.texts, "skipped_pairs": res.skipped_pairs,
                   "missing_images": len(res.missing_images), "bad_images": len(res.bad_images)}, f, indent=1)
    return res


# ---- the final step --------------------------------------------------------------------------

def _check_shard(opts: BuildOptions, index: int, want: Dict) -> Tuple[Optional[Dict], str]:
    """(shard.json, "") when shard `index` is complete and consistent, else (None, what is wrong)."""
    sdir = shard_dir(opts.output, index)
    if not (sdir / SHARD_DONE).is_file():
        return None, f"shard {index} is not built ({sdir})"
    info = read_json_object(sdir / SHARD_DONE)
    if info.get("settings") != want:
        return None, f"shard {index} was built with other settings ({sdir / SHARD_DONE})"
    try:
        arr = {n: np.load(sdir / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in
               ("image_ids", "pair_image", "pair_text", "tokens")}
        store = ImageStore(sdir / "images")
    except (OSError, ValueError) as e:  # InputError is a ValueError
        return None, f"shard {index}: {e}"
    n_img, n_pair, n_text = info["images"], info["pairs"], info["texts"]
    ok = (len(store) == n_img == len(arr["image_ids"]) and len(arr["pair_image"]) == n_pair ==
          len(arr["pair_text"]) and arr["tokens"].shape == (n_text, opts.context_length) and
          (n_pair == 0 or (int(arr["pair_image"].max()) < n_img and int(arr["pair_text"].max()) < n_text)))
    store.close()
    return (info, "") if ok else (None, f"shard {index}: arrays or image count disagree with {SHARD_DONE}")


def _sources(opts: BuildOptions, want: Dict) -> Dict:
    if opts.queries is None:
        return {"shards": str(opts.images), "caption_from": opts.caption_from}
    return {"queries": str(Path(opts.queries).resolve()), "queries_bytes": want["queries"]["bytes"],
            "images": str(Path(opts.images).resolve())}


def _sample_counts(infos: List[Dict]) -> Dict:
    """A data set built from tar shards: samples skipped per reason, and how image ids were made."""
    if not any("skipped_samples" in i for i in infos):
        return {}
    reasons: Dict[str, int] = {}
    for i in infos:
        for reason, n in i.get("skipped_samples", {}).items():
            reasons[reason] = reasons.get(reason, 0) + int(n)
    return {"samples": sum(int(i.get("samples", 0)) for i in infos), "skipped_samples": reasons,
            "image_ids": {"from": "sample key (its integer value when it is decimal digits)",
                          "hashed": sum(int(i.get("hashed_ids", 0)) for i in infos), "hash": KEY_HASH}}


def finalize(opts: BuildOptions, num_shards: int) -> Dict:
    """Check every shard; write manifest.json with complete: true (the data set's last write)."""
    want = settings(opts, num_shards)
    infos, problems = [], []
    for s in range(num_shards):
        info, problem = _check_shard(opts, s, want)
        infos.append(info)
        if problem:
            problems.append(problem)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InputError(f"{opts.output}: cannot finalize: {'; '.join(problems[:5])}{more}")
    store = ImageStore(shard_dir(opts.output, 0) / "images")
    tokens = np.load(shard_dir(opts.output, 0) / "tokens.npy", mmap_mode="r")
    vocab = vocab_fingerprint(opts.vocab)
    manifest = {
        "format": DATASET_FORMAT, "num_shards": num_shards,
        "shards": [{"path": str(shard_dir(".", s)), "images": i["images"], "pairs": i["pairs"],
                    "texts": i["texts"], "skipped_pairs": i["skipped_pairs"]} for s, i in enumerate(infos)],
        "pairs": sum(i["pairs"] for i in infos), "images": sum(i["images"] for i in infos),
        "skipped_pairs": sum(i["skipped_pairs"] for i in infos),
        "resolution": opts.resolution, "mean": list(store.mean), "std": list(store.std),
        "preprocessing": {"resize": want["resize"], "interpolation": "bicubic", "layout": "CHW uint8 RGB"},
        "image_format": opts.image_format, "jpeg_quality": want["jpeg_quality"],
        "tokenizer": {"vocab_sha256": vocab["vocab_sha256"], "vocab_size": vocab["vocab_size"],
                      "vocab_file": str(Path(vocab["vocab_file"]).resolve())},
        "context_length": opts.context_length, "token_dtype": str(tokens.dtype),
        "sources": _sources(opts, want), **_sample_counts(infos),
        "on_error": opts.on_error, "complete": True,
    }
    with atomic_write(Path(opts.output) / MANIFEST) as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return manifest


def build_dataset(opts: BuildOptions, shard_index: Optional[int] = None,
                  finalize_only: bool = False) -> Tuple[List[ShardResult], Optional[Dict]]:
    """Build every shard then finalize (shard_index None), one shard (a cluster job), or only the
    final step. Shards already built are checked, not rebuilt."""
    if finalize_only:
        if not opts.num_shards:
            raise InputError("--finalize needs --num-shards (the number the shards were built with)")
        return [], finalize(opts, opts.num_shards)
    if shard_index is not None and not opts.num_shards:
        raise InputError("--shard-index needs --num-shards (every shard job must agree on it)")
    plan = read_plan(Path(opts.queries), opts.progress)
    num_shards = opts.num_shards or num_shards_for(plan, opts.shard_size)
    if shard_index is not None and not 0 <= shard_index < num_shards:
        raise InputError(f"--shard-index {shard_index} is outside 0..{num_shards - 1}")
    indices = [shard_index] if shard_index is not None else list(range(num_shards))
    todo = [s for s in indices if not (shard_dir(opts.output, s) / SHARD_DONE).is_file()]
    # Several shards in this process: tokenize every distinct text once rather than once per shard.
    tokens_all = (tokenize_texts(plan.texts, opts.vocab, opts.context_length, opts.workers, opts.progress)
                  if len(todo) > 1 else None)
    assign = shard_of(plan.pair_image, num_shards).astype(np.int32) if len(todo) > 1 else None
    results = [build_shard(opts, plan, s, num_shards, tokens_all, assign) for s in indices]
    return results, (finalize(opts, num_shards) if shard_index is None else None)
