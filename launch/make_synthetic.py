"""Write the synthetic MUGE-format data set (coloured shapes with Chinese captions).

  python launch/make_synthetic.py --out data/synthetic [--seed 0] [--build-lmdb]

Writes {train,valid,test}_imgs.tsv, {train,valid,test}_queries.jsonl, vocab.txt and meta.json;
with --build-lmdb also the image stores OUT/lmdb/{train,valid,test} at the image size.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.synthetic import DEFAULT_SIZES, SPLITS, make_synthetic  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    for split in SPLITS:
        p.add_argument(f"--{split}-images", type=int, default=DEFAULT_SIZES[split])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--build-lmdb", action="store_true", help="also build OUT/lmdb/<split> image stores")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    sizes = {s: getattr(a, f"{s}_images") for s in SPLITS}
    meta = make_synthetic(a.out, seed=a.seed, sizes=sizes, image_size=a.image_size, workers=a.workers,
                          progress=not a.no_progress)
    for split, c in meta["counts"].items():
        print(f"{split}: {c['images']} images, {c['queries']} queries, {c['pairs']} pairs")
    if a.build_lmdb:
        from data.build import build_store

        for split in SPLITS:
            out = os.path.join(a.out, "lmdb", split)
            r = build_store(os.path.join(a.out, f"{split}_imgs.tsv"), out, a.image_size,
                            workers=a.workers, progress=not a.no_progress)
            print(f"{out}: {r.manifest['count']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
