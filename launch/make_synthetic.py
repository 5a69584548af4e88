"""Write the synthetic MUGE-format data set (coloured shapes with Chinese captions).

  python launch/make_synthetic.py --out data/synthetic [--seed 0] [--build-lmdb]

Writes {train,valid,test}_imgs.tsv, {train,valid,test}_queries.jsonl, vocab.txt and meta.json;
with --build-lmdb also the image stores OUT/lmdb/{train,valid,test} at the image size. Always also
the zero-shot files: {split}_labels_{colour,shape}.jsonl ({"image_id", "label"} per image),
classes_{colour,shape}.txt and zeroshot_templates.txt (for launch/zeroshot.py).

Held-out compositions (generalisation, not memorisation):
  --holdout-cells 43       43 colour x shape x position cells never in training (captions or images)
  --holdout-phrasings      valid/test also ask every seen cell in a phrasing training never uses
Valid/test queries are then also written per category: {split}_queries_seen.jsonl,
{split}_queries_heldout_cells.jsonl, {split}_queries_heldout_phrasings.jsonl; score one
prediction file against each (launch/evaluate.py ignores predictions outside the reference).
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
    p.add_argument("--holdout-cells", type=int, default=0,
                   help="colour x shape x position cells kept out of training (0-216; default 0)")
    p.add_argument("--holdout-phrasings", action="store_true",
                   help="valid/test also query seen cells in caption phrasings training never uses")
    p.add_argument("--build-lmdb", action="store_true", help="also build OUT/lmdb/<split> image stores")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    sizes = {s: getattr(a, f"{s}_images") for s in SPLITS}
    if not 0 <= a.holdout_cells <= 216:
        p.error(f"--holdout-cells must be between 0 and 216, got {a.holdout_cells}")
    meta = make_synthetic(a.out, seed=a.seed, sizes=sizes, image_size=a.image_size, workers=a.workers,
                          progress=not a.no_progress, holdout=a.holdout_cells,
                          holdout_phrasings=a.holdout_phrasings)
    for split, c in meta["counts"].items():
        cats = ", ".join(f"{c[k]} {k[len('queries_'):]}" for k in c if k.startswith("queries_"))
        print(f"{split}: {c['images']} images, {c['queries']} queries ({cats or 'all seen'}), {c['pairs']} pairs")
    if meta["holdout"]["cells"]:
        print(f"held out of training: {len(meta['holdout']['cells'])} cells, e.g. "
              + ", ".join("".join(cell) for cell in meta["holdout"]["cells"][:3]))
    if a.build_lmdb:
        from data.images.build_store import build_store

        for split in SPLITS:
            out = os.path.join(a.out, "lmdb", split)
            r = build_store(os.path.join(a.out, f"{split}_imgs.tsv"), out, a.image_size,
                            workers=a.workers, progress=not a.no_progress)
            print(f"{out}: {r.manifest['count']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
