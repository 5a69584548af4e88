"""Write one self-contained HTML page of retrieval results: for N sample queries, the query text and
its top-k images (thumbnails embedded), correct ones marked, with R@1/5/10 and mean recall on top.

  python launch/gallery.py --predictions runs/demo/valid_predictions.jsonl \
      --queries runs/demo/data/valid_queries.jsonl --images runs/demo/lmdb/valid \
      --output runs/demo/gallery.html [--num-queries 24] [--seed 0]
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.files import InputError, atomic_write, read_jsonl  # noqa: E402
from data.lmdb_store import ImageStore  # noqa: E402
from data.pairs import read_queries  # noqa: E402
from engine.gallery import choose_queries, render_gallery  # noqa: E402
from engine.metrics import muge_scores  # noqa: E402
from engine.muge_eval import parse_predictions  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, help="MUGE prediction jsonl (launch/retrieve.py output)")
    p.add_argument("--queries", required=True, help="the split's *_queries.jsonl with item_ids (the answers)")
    p.add_argument("--images", required=True, help="the image store (launch/build_lmdb.py output)")
    p.add_argument("--output", required=True, help="the HTML file to write")
    p.add_argument("--num-queries", type=int, default=24)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="which sample of queries to show")
    args = p.parse_args(argv)
    try:
        queries = read_queries(args.queries)
        references = {q.query_id: q.item_ids for q in queries if q.item_ids}
        if not references:
            raise InputError(f"{args.queries}: no query has item_ids, so nothing can be marked correct")
        pred_path = Path(args.predictions)
        predictions = parse_predictions(pred_path, list(read_jsonl(pred_path)), references, args.top_k)
        store = ImageStore(args.images)
        shown = choose_queries(list(references), args.num_queries, args.seed)
        missing = sorted({i for q in shown for i in predictions[q] if i not in store})
        if missing:
            raise InputError(f"{args.images}: predicted image ids not in the store: {missing[:10]}")
        page = render_gallery(predictions, references, {q.query_id: q.text for q in queries},
                              store.get, muge_scores(predictions, references), shown,
                              title=f"Text-to-image retrieval: {Path(args.queries).name}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with atomic_write(args.output) as f:
        f.write(page)
    print(f"wrote {args.output} ({len(shown)} queries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
