"""The MUGE retrieval server's evaluator: schema checks on a prediction file, then mean recall.

Prediction lines: {"query_id": int, "item_ids": [k ints]}; reference lines: {"query_id": int,
"item_ids": [ints], ...}. Chinese-CLIP's names ({"text_id", "image_ids"}) are accepted in both.
Like the server, a prediction is rejected unless every reference query is predicted with exactly
k unique integer ids and an integer query id; predictions for queries outside the reference are
ignored. Stricter than the server in two places, both of which hide bugs there: a query predicted
twice is an error (the server silently keeps the last line), and JSON booleans are not ids.

The result file has the server's shape: {"success", "score", "scoreJson": {score, mean_recall, r1,
r5, r10}} in percent, or success=false with the message in "errorMsg"/"errorDetail".
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from data.files import InputError, atomic_write, read_jsonl
from engine.metrics import muge_scores

QUERY_KEYS = ("query_id", "text_id")
ITEM_KEYS = ("item_ids", "image_ids")
TEXT_KEYS = ("query_text", "text")

Rows = List[Tuple[int, Dict[str, Any]]]


class SchemaError(InputError):
    """A prediction or reference file breaks the MUGE schema."""


def _is_int(x: Any) -> bool:
    # bool is a subclass of int in Python, but `true` is not an id in JSON.
    return isinstance(x, int) and not isinstance(x, bool)


def _field(obj: Dict[str, Any], keys: Tuple[str, ...], where: str, what: str) -> Any:
    present = [k for k in keys if k in obj]
    if not present:
        raise SchemaError(f"{where}: no {what} field (expected one of {', '.join(keys)})")
    values = [obj[k] for k in present]
    if any(v != values[0] for v in values[1:]):
        raise SchemaError(f"{where}: fields {' and '.join(present)} disagree")
    return values[0]


def _query_id(obj: Dict[str, Any], where: str) -> int:
    qid = _field(obj, QUERY_KEYS, where, "query id")
    if not _is_int(qid):
        raise SchemaError(f"{where}: query id {qid!r} is not an integer (a JSON number without quotes)")
    return qid


def _read_rows(path: Path) -> Rows:
    return list(read_jsonl(path))


def parse_reference(path: Path, rows: Rows) -> Dict[int, List[int]]:
    reference: Dict[int, List[int]] = {}
    for lineno, obj in rows:
        where = f"{path}:{lineno}"
        qid = _query_id(obj, where)
        items = _field(obj, ITEM_KEYS, where, "item ids")
        if not isinstance(items, list) or not all(_is_int(i) for i in items):
            raise SchemaError(f"{where}: reference item ids of query {qid} must be a list of integers")
        if qid in reference:
            raise SchemaError(f"{where}: query {qid} appears twice in the reference")
        reference[qid] = items
    if not reference:
        raise SchemaError(f"{path}: the reference holds no queries")
    return reference


def parse_predictions(path: Path, rows: Rows, reference: Dict[int, List[int]], k: int = 10
                      ) -> Dict[int, List[int]]:
    predictions: Dict[int, List[int]] = {}
    for lineno, obj in rows:
        where = f"{path}:{lineno}"
        qid = _query_id(obj, where)
        items = _field(obj, ITEM_KEYS, where, "predicted item ids")
        if not isinstance(items, list):
            raise SchemaError(f"{where}: the predicted ids of query {qid} are not a list")
        if len(items) != k:
            raise SchemaError(f"{where}: query {qid} has {len(items)} predicted ids, exactly {k} are required")
        for rank, item in enumerate(items, start=1):
            if not _is_int(item):
                raise SchemaError(f"{where}: query {qid} has a non-integer predicted id {item!r} at rank {rank}")
        if len(set(items)) != k:
            raise SchemaError(f"{where}: query {qid} has duplicate predicted ids")
        if qid in predictions:
            raise SchemaError(f"{where}: query {qid} is predicted twice")
        predictions[qid] = items
    missing = [q for q in reference if q not in predictions]
    if missing:
        shown = ", ".join(str(q) for q in missing[:20]) + (", ..." if len(missing) > 20 else "")
        raise SchemaError(f"{path}: {len(missing)} reference queries have no prediction: {shown}")
    return predictions


def swap_hint(pred_rows: Rows, ref_rows: Rows, k: int = 10) -> Optional[str]:
    """A sentence when PRED looks like a reference file and REF like a prediction file."""
    def has_text(rows: Rows) -> bool:
        return any(any(t in obj for t in TEXT_KEYS) for _, obj in rows)

    def all_k(rows: Rows) -> bool:
        sizes = [len(obj.get("item_ids", obj.get("image_ids", [])) or []) for _, obj in rows]
        return bool(sizes) and all(s == k for s in sizes)

    if has_text(pred_rows) and not has_text(ref_rows):
        return "the PRED file has query texts and the REF file has none: were PRED and REF swapped?"
    if all_k(ref_rows) and not all_k(pred_rows) and not has_text(ref_rows):
        return (f"the REF file has exactly {k} ids on every line and the PRED file does not: "
                f"were PRED and REF swapped?")
    return None


def evaluate(pred_path, ref_path, k: int = 10) -> Dict[str, float]:
    """Scores in percent; raises SchemaError (with a swap hint when it fits) on a bad file."""
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    ref_rows = _read_rows(ref_path)
    pred_rows = _read_rows(pred_path)
    try:
        reference = parse_reference(ref_path, ref_rows)
        predictions = parse_predictions(pred_path, pred_rows, reference, k)
    except SchemaError as e:
        hint = swap_hint(pred_rows, ref_rows, k)
        raise SchemaError(f"{e} ({hint})" if hint else str(e)) from None
    hint = swap_hint(pred_rows, ref_rows, k)
    if hint:
        print(f"warning: {hint}", file=sys.stderr)
    return muge_scores(predictions, reference)


def result_json(scores: Optional[Dict[str, float]] = None, error: Optional[str] = None) -> Dict[str, Any]:
    if error is not None:
        return {"success": False, "score": 0, "scoreJson": {}, "errorMsg": error, "errorDetail": error}
    assert scores is not None
    mr = scores["mean_recall"]
    return {"success": True, "score": mr,
            "scoreJson": {"score": mr, "mean_recall": mr, "r1": scores["r1"], "r5": scores["r5"],
                          "r10": scores["r10"]}}


EXIT_BAD_INPUT = 2


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
