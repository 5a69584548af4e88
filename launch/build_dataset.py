"""Build a sharded, pre-tokenized training set: image shards (LMDB) + memory-mapped pair arrays + manifest.

  python launch/build_dataset.py --queries DATA/train_queries.jsonl --images DATA/train_imgs.tsv \\
      --output DATA/built/train --vocab DATA/vocab.txt --context-length 52 --resolution 224 --workers 16

  # one cluster job per shard, then the final step:
  python launch/build_dataset.py ... --num-shards 64 --shard-index $I
  python launch/build_dataset.py ... --num-shards 64 --finalize

--queries: MUGE's *_queries.jsonl or Chinese-CLIP's *_texts.jsonl (told apart by content).
--images: a MUGE *_imgs.tsv, a folder of <id>.<ext> images, a Chinese-CLIP LMDB (lmdb/{split} or its
imgs/), or a store from launch/build_lmdb.py. Or, without --queries, webdataset/img2dataset tar shards
holding images and captions ('shards/{00000..01023}.tar', a glob, or URLs with fsspec):

  python launch/build_dataset.py --images 'laion_zh/{00000..01023}.tar' --output DATA/built/laion_zh \
      --vocab DATA/vocab.txt --resolution 224 --on-error skip     # --caption-from json:caption
Rerunning a command resumes it: finished shards are checked and kept, a half-built one continues.
Train with `train.py --train-data OUTPUT` (no --train-img).
"""
import argparse
import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.built.builder import build_dataset  # noqa: E402
from data.built.from_shards import build_dataset_from_shards  # noqa: E402
from data.built.layout import DEFAULT_SHARD_SIZE, BuildOptions  # noqa: E402
from data.files import InputError, report_input_error  # noqa: E402
from data.images.shards import is_shard_spec  # noqa: E402
from data.images.sources import source_note  # noqa: E402
from data.queries import describe_schema, queries_schema  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", default=None, help="MUGE *_queries.jsonl or Chinese-CLIP *_texts.jsonl (every "
                   "line needs its image ids); leave out for tar shards, which hold their captions")
    p.add_argument("--images", required=True, help="*_imgs.tsv, an image folder, a Chinese-CLIP LMDB, a "
                   "launch/build_lmdb.py store, or tar shards ('shards/{00000..00099}.tar', a glob, URLs); quote "
                   "a pattern")
    p.add_argument("--caption-from", default="txt", help="tar shards: each sample's .txt (default) or json:FIELD, "
                   "a field of its .json (a string, or a list of strings: several captions of one image)")
    p.add_argument("--output", required=True, help="folder of the data set to create or resume")
    p.add_argument("--vocab", required=True, help="tokenizer folder or vocab.txt (the run's --vocab)")
    p.add_argument("--context-length", type=int, default=52, help="text tokens incl. [CLS]/[SEP]")
    p.add_argument("--resolution", type=int, required=True, help="side R of the stored R×R images")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="images per shard, on average (sets the number of shards when --num-shards is absent; "
                   "from tar shards the default is one output shard per input shard)")
    p.add_argument("--num-shards", type=int, default=None, help="number of output shards (needed with "
                   "--shard-index and --finalize from a queries file: every job must agree); from tar shards, "
                   "input shard j goes to output shard j %% N")
    p.add_argument("--shard-index", type=int, default=None, help="build only this shard (a cluster job)")
    p.add_argument("--finalize", action="store_true", help="only check the shards and write the manifest")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding/tokenizing processes")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="a missing or corrupt image (or, from tar shards, any bad sample): stop naming it (fail), or "
                   "drop its pairs, count them and list them in shards/*/skipped.tsv (skip)")
    p.add_argument("--format", dest="image_format", choices=["uint8", "jpeg"], default="uint8",
                   help="uint8 tensors (no decoding, 3*R*R bytes) or JPEG bytes (5-10x smaller, decoded at load)")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--resize", choices=["squash", "center-crop"], default="squash",
                   help="how a tsv/folder image becomes R×R: squash (Chinese-CLIP's, default) or center-crop; "
                        "a launch/build_lmdb.py store keeps the mode it was built with")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    checks = [(a.resolution > 0, "--resolution must be positive"),
              (3 <= a.context_length <= 512, "--context-length must be in 3..512"),
              (a.shard_size >= 1, "--shard-size must be >= 1"),
              (a.num_shards is None or a.num_shards >= 1, "--num-shards must be >= 1"),
              (1 <= a.jpeg_quality <= 100, "--jpeg-quality must be in 1..100"),
              (not (a.finalize and a.shard_index is not None), "--finalize and --shard-index exclude each other")]
    shards = a.queries is None and is_shard_spec(a.images)
    checks.append((a.queries is not None or shards, "--queries is required unless --images names tar shards"))
    for ok, msg in checks:
        if not ok:
            print(f"build_dataset.py: error: {msg}", file=sys.stderr)
            return 2
    note = source_note(a.images)
    if note:
        print(f"build_dataset.py: note: {note}", file=sys.stderr)
    opts = BuildOptions(queries=Path(a.queries) if a.queries else None,
                        images=a.images if is_shard_spec(a.images) else Path(a.images), output=Path(a.output),
                        vocab=Path(a.vocab),
                        context_length=a.context_length, resolution=a.resolution, shard_size=a.shard_size,
                        num_shards=a.num_shards, workers=max(1, a.workers), on_error=a.on_error,
                        image_format=a.image_format, jpeg_quality=a.jpeg_quality, progress=not a.no_progress,
                        resize=a.resize, caption_from=a.caption_from)
    t0 = time.perf_counter()
    try:
        if shards:
            results, manifest = build_dataset_from_shards(opts, a.shard_index, a.finalize)
        else:
            print(describe_schema(opts.queries, queries_schema(opts.queries)))
            results, manifest = build_dataset(opts, a.shard_index, a.finalize)
    except InputError as e:
        return report_input_error("build_dataset.py", e)
    took = time.perf_counter() - t0
    for r in results:
        state = "already built" if r.already_built else "built"
        print(f"shard {r.index}: {state}: {r.images} images, {r.pairs} pairs, {r.texts} distinct texts"
              + (f", {r.skipped_pairs} pairs skipped" if r.skipped_pairs else ""))
    skipped = sum(r.skipped_pairs for r in results)
    if a.on_error == "skip" and shards:
        reasons = collections.Counter(row[2].split(":")[0] for r in results for row in r.bad_images)
        print(f"skipped {sum(reasons.values())} sample(s) built now"
              + (f" ({', '.join(f'{k}: {n}' for k, n in sorted(reasons.items()))})" if reasons else "")
              + f"; listed in {opts.output}/shards/*/skipped.tsv")
    elif a.on_error == "skip":
        print(f"skipped {skipped} pair(s) whose image is missing or unreadable "
              f"({sum(len(r.missing_images) + len(r.bad_images) for r in results)} image(s) built now; "
              f"listed in {opts.output}/shards/*/skipped.tsv)")
    if manifest is not None:
        print(f"{opts.output}: {manifest['pairs']} pairs, {manifest['images']} images in "
              f"{manifest['num_shards']} shard(s), {manifest['image_format']} {manifest['resolution']}px, "
              f"built in {took:.1f}s ({manifest['pairs'] / max(took, 1e-9):.0f} pairs/s); "
              f"train with --train-data {opts.output}")
    else:
        print(f"shard {a.shard_index} done in {took:.1f}s; when every shard is built, run this command with "
              f"--finalize instead of --shard-index")
    return 0


if __name__ == "__main__":
    sys.exit(main())
