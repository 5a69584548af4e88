"""Write one self-contained HTML page of retrieval results: for N sample queries, the query text and
its top-k images (thumbnails embedded), correct ones marked ✓ and wrong ones ✗ (and by colour), the
correct images that were not retrieved, with R@1/5/10 and mean recall on top.

  python launch/gallery.py --predictions runs/demo/valid_predictions.jsonl \
      --queries runs/demo/data/valid_queries.jsonl --images runs/demo/lmdb/valid \
      --output runs/demo/gallery.html [--run runs/demo/train] [--failures-only] [--num-queries 24] [--seed 0]

--run names the run the predictions come from as the other tools do (its model_fp32.pt must be there);
the title shows its name and what its model is.

A test split's queries (no item_ids) give a page of unmarked results.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.files import InputError, atomic_write, read_jsonl, report_input_error  # noqa: E402
from data.images.store import ImageStore  # noqa: E402
from data.queries import read_queries  # noqa: E402
from engine.inference.naming import model_path  # noqa: E402
from engine.inference.source import describe, summary  # noqa: E402
from engine.tools.gallery import choose_queries, failed_queries, render_gallery  # noqa: E402
from engine.scoring.recall import muge_scores  # noqa: E402
from engine.scoring.predictions import parse_predictions  # noqa: E402


def _run_title(run) -> str:
    """' · run NAME (the model)' for the page's title; the run is named as every tool names it."""
    if not run:
        return ""
    desc = describe(model_path(run=run))  # None: an older model_fp32.pt without a record
    return f" · run {Path(run).name}" + (f" ({summary(desc)})" if desc else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, help="MUGE prediction jsonl (launch/retrieve.py output)")
    p.add_argument("--queries", required=True, help="the split's *_queries.jsonl; with item_ids (the answers) "
                   "results are marked, without (a test split) they are shown unmarked")
    p.add_argument("--images", required=True, help="the image store (launch/build_lmdb.py output)")
    p.add_argument("--output", required=True, help="the HTML file to write")
    p.add_argument("--run", default=None, help="the run the predictions come from (a run dir of launch/train.py "
                   "--export, as every tool names a model): its name and model go into the title")
    p.add_argument("--failures-only", action="store_true",
                   help="show only queries with no correct image in their top-k")
    p.add_argument("--num-queries", type=int, default=24)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="which sample of queries to show")
    args = p.parse_args(argv)
    try:
        queries = read_queries(args.queries)
        references = {q.query_id: q.item_ids for q in queries if q.item_ids}
        if args.failures_only and not references:
            raise InputError(f"{args.queries}: no query has item_ids, so no result can be called a failure")
        pred_path = Path(args.predictions)
        # A test split has no answers: every query must still be predicted, and nothing is marked.
        expected = references or {q.query_id: [] for q in queries}
        predictions = parse_predictions(pred_path, list(read_jsonl(pred_path)), expected, args.top_k)
        store = ImageStore(args.images)
        pool = failed_queries(predictions, references) if args.failures_only else list(expected)
        shown = choose_queries(pool, args.num_queries, args.seed)
        missing = sorted({i for q in shown for i in predictions[q] if i not in store})
        if missing:
            raise InputError(f"{args.images}: predicted image ids not in the store: {missing[:10]}")
        metrics = muge_scores(predictions, references) if references else None
        run = _run_title(args.run)
        note = f" of {len(pool)}{' failing' if args.failures_only else ''} (the split has {len(expected)} queries)"
        page = render_gallery(predictions, references, {q.query_id: q.text for q in queries},
                              lambda i: store.get(i) if i in store else None, metrics, shown,
                              title=f"Text-to-image retrieval: {Path(args.queries).name}{run}", note=note)
    except InputError as e:
        return report_input_error("gallery.py", e)
    with atomic_write(args.output) as f:
        f.write(page)
    print(f"wrote {args.output} ({len(shown)} queries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
