"""The MUGE retrieval server's evaluator: schema checks on a prediction file, then mean recall.

The files and their checks are engine/scoring/predictions.py's: like the server, a prediction is
rejected unless every reference query is predicted with exactly k unique integer ids; predictions
for queries outside the reference are ignored; both files must be UTF-8 with a JSON object on every
line (a blank line is rejected, even one extra newline at the end of the file).

Which file is the reference and which the prediction is read from their content, so both argument
orders work (the server's script takes REF PRED OUT, our README PRED REF OUT): the reference carries
query texts, a prediction does not; failing that, the file with exactly k ids on every line is the
prediction. When the content cannot tell them apart the order given is kept.

The result file has the server's shape: {"success", "score", "scoreJson": {score, mean_recall, r1,
r5, r10}} in percent, or success=false with the message in "errorMsg"/"errorDetail".
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from data.files import EXIT_BAD_INPUT, InputError, atomic_write
from engine.scoring.predictions import (ITEM_KEYS, TEXT_KEYS, Rows, check_one_schema, parse_predictions,
                                       parse_reference, read_rows)
from engine.scoring.recall import muge_scores

def _has_text(rows: Rows) -> bool:
    return any(any(t in obj for t in TEXT_KEYS) for _, obj in rows)


def _all_k(rows: Rows, k: int) -> bool:
    def size(obj: Dict[str, Any]) -> int:
        items = next((obj[key] for key in ITEM_KEYS if key in obj), None)
        return len(items) if isinstance(items, list) else -1

    return bool(rows) and all(size(obj) == k for _, obj in rows)


def is_swapped(first: Rows, second: Rows, k: int = 10) -> bool:
    """True when the content says `first` is the reference and `second` the prediction. The reference
    has query texts and a prediction none; else the prediction has exactly k ids on every line and the
    reference does not. Files the content cannot tell apart keep the order given (False)."""
    if _has_text(first) != _has_text(second):
        return _has_text(first)
    if _all_k(first, k) != _all_k(second, k):
        return _all_k(second, k)
    return False


def evaluate(pred_path, ref_path, k: int = 10) -> Dict[str, float]:
    """Scores in percent; raises SchemaError on a bad file. The two files may come in either order
    (see is_swapped); a line on stderr says which was taken as which."""
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    pred_rows = read_rows(pred_path)
    ref_rows = read_rows(ref_path)
    swapped = is_swapped(pred_rows, ref_rows, k)
    if swapped:
        pred_path, ref_path, pred_rows, ref_rows = ref_path, pred_path, ref_rows, pred_rows
    print(f"reference: {ref_path}; predictions: {pred_path}" +
          (" (told from their content: they were given in the order REF PRED)" if swapped else "") +
          f"; {check_one_schema(ref_path, ref_rows)} schema", file=sys.stderr)
    reference = parse_reference(ref_path, ref_rows)
    predictions = parse_predictions(pred_path, pred_rows, reference, k)
    return muge_scores(predictions, reference)


def result_json(scores: Optional[Dict[str, float]] = None, error: Optional[str] = None) -> Dict[str, Any]:
    if error is not None:
        return {"success": False, "score": 0, "scoreJson": {}, "errorMsg": error, "errorDetail": error}
    assert scores is not None
    mr = scores["mean_recall"]
    return {"success": True, "score": mr,
            "scoreJson": {"score": mr, "mean_recall": mr, "r1": scores["r1"], "r5": scores["r5"],
                          "r10": scores["r10"]}}


def run(pred_path, ref_path, out_path, k: int = 10) -> int:
    """Evaluate and write the result JSON atomically; 0 on success, EXIT_BAD_INPUT (2) when an
    input file is missing or breaks the schema (the JSON then says success=false and why)."""
    try:
        result = result_json(scores=evaluate(pred_path, ref_path, k))
        code = 0
    except InputError as e:
        result = result_json(error=str(e))
        code = EXIT_BAD_INPUT
    with atomic_write(out_path) as f:
        json.dump(result, f, ensure_ascii=False, indent=2)
        f.write("\n")
    return code
