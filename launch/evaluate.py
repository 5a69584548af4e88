"""Score a MUGE text-to-image prediction file the way the MUGE server does (mean of R@1/5/10).

  python launch/evaluate.py PRED.jsonl REF.jsonl OUT.json
  python launch/evaluate.py REF.jsonl PRED.jsonl OUT.json      (the server script's order: also works)
  python launch/evaluate.py --pred PRED.jsonl --ref valid_queries.jsonl --out score.json

Which file is the reference is read from the content (it has the query texts) and printed.

PRED lines: {"query_id": q, "item_ids": [10 ints]} (Chinese-CLIP's text_id/image_ids also work).
OUT gets {"success", "score", "scoreJson": {score, mean_recall, r1, r5, r10}} in percent; on a
schema error it gets success=false with the message, and the exit status is 2.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.muge_eval import run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", metavar="PRED REF OUT",
                   help="positional form; PRED and REF may come in either order (told apart by content)")
    p.add_argument("--pred", help="prediction jsonl")
    p.add_argument("--ref", help="reference jsonl (queries with item_ids)")
    p.add_argument("--out", help="where to write the result JSON")
    p.add_argument("--top-k", type=int, default=10, help="ids each prediction must hold (MUGE: 10)")
    a = p.parse_args(argv)
    if a.files and len(a.files) != 3:
        p.error("give PRED REF OUT positionally, or --pred/--ref/--out")
    pred, ref, out = a.files if a.files else (a.pred, a.ref, a.out)
    if not (pred and ref and out):
        p.error("PRED, REF and OUT are required")
    code = run(pred, ref, out, k=a.top_k)
    with open(out, encoding="utf-8") as f:
        result = json.load(f)
    if result["success"]:
        s = result["scoreJson"]
        print(f"mean recall {s['mean_recall']:.2f} (R@1 {s['r1']:.2f} R@5 {s['r5']:.2f} "
              f"R@10 {s['r10']:.2f}) -> {out}")
    else:
        print(f"evaluate.py: error: {result['errorMsg']} (written to {out})", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
