"""Build a sharded, pre-tokenized training set: image shards (LMDB) + memory-mapped pair arrays + manifest.

  python launch/build_dataset.py --queries DATA/train_queries.jsonl --images DATA/train_imgs.tsv \\
      --output DATA/built/train --vocab DATA/vocab.txt --context-length 52 --resolution 224 --workers 16

  # one cluster job per shard, then the final step:
  python launch/build_dataset.py ... --num-shards 64 --shard-index $I
  python launch/build_dataset.py ... --num-shards 64 --finalize

--images: a MUGE *_imgs.tsv, a folder of <id>.<ext> images, or a store from launch/build_lmdb.py.
Rerunning a command resumes it: finished shards are checked and kept, a half-built one continues.
Train with `train.py --train-data OUTPUT` (no --train-img).
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.built.builder import build_dataset  # noqa: E402
from data.built.layout import DEFAULT_SHARD_SIZE, BuildOptions  # noqa: E402
from data.files import InputError, report_input_error  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", required=True, help="MUGE *_queries.jsonl (every query needs item_ids)")
    p.add_argument("--images", required=True, help="*_imgs.tsv, an image folder, or a launch/build_lmdb.py store")
    p.add_argument("--output", required=True, help="folder of the data set to create or resume")
    p.add_argument("--vocab", required=True, help="tokenizer folder or vocab.txt (the run's --vocab)")
    p.add_argument("--context-length", type=int, default=52, help="text tokens incl. [CLS]/[SEP]")
    p.add_argument("--resolution", type=int, required=True, help="side R of the stored R×R images")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="images per shard, on average (sets the number of shards when --num-shards is absent)")
    p.add_argument("--num-shards", type=int, default=None, help="number of image shards (needed with "
                   "--shard-index and --finalize: every job must agree)")
    p.add_argument("--shard-index", type=int, default=None, help="build only this shard (a cluster job)")
    p.add_argument("--finalize", action="store_true", help="only check the shards and write the manifest")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding/tokenizing processes")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="a missing or corrupt image: stop naming it (fail), or drop its pairs, count them and "
                   "list them in shards/*/skipped.tsv (skip)")
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
    for ok, msg in checks:
        if not ok:
            print(f"build_dataset: error: {msg}", file=sys.stderr)
            return 2
    opts = BuildOptions(queries=Path(a.queries), images=Path(a.images), output=Path(a.output), vocab=Path(a.vocab),
                        context_length=a.context_length, resolution=a.resolution, shard_size=a.shard_size,
                        num_shards=a.num_shards, workers=max(1, a.workers), on_error=a.on_error,
                        image_format=a.image_format, jpeg_quality=a.jpeg_quality, progress=not a.no_progress,
                        resize=a.resize)
    t0 = time.perf_counter()
    try:
        results, manifest = build_dataset(opts, a.shard_index, a.finalize)
    except InputError as e:
        return report_input_error("build_dataset.py", e)
    took = time.perf_counter() - t0
    for r in results:
        state = "already built" if r.already_built else "built"
        print(f"shard {r.index}: {state}: {r.images} images, {r.pairs} pairs, {r.texts} distinct texts"
              + (f", {r.skipped_pairs} pairs skipped" if r.skipped_pairs else ""))
    skipped = sum(r.skipped_pairs for r in results)
    if a.on_error == "skip":
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
