"""The MUGE retrieval server's evaluator: schema checks on a prediction file, then mean recall.

Prediction lines: {"query_id": int, "item_ids": [k ints]}; reference lines: {"query_id": int,
"item_ids": [ints], ...}. Chinese-CLIP's names ({"text_id", "image_ids"}) are accepted in both.
Like the server, a prediction is rejected unless every reference query is predicted with exactly
k unique integer ids and an integer query id; predictions for queries outside the reference are
ignored. Like the server, both files must be UTF-8 and every line must hold a JSON object: a blank
or whitespace-only line is rejected, even one extra newline at the end of the file. Stricter than the
server in two places, both of which hide bugs there: a query predicted twice is an error (the server
silently keeps the last line), and JSON booleans are not ids.

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
from typing import Any, Dict, List, Optional, Tuple

from data.files import EXIT_BAD_INPUT, InputError, atomic_write, json_object_line
from engine.scoring.recall import muge_scores

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
    """(line number, object) for every line, as strict as the server: UTF-8, one JSON object per line,
    no blank lines. Line breaks are read as Python's text mode (the server's) reads them."""
    if not path.is_file():
        raise SchemaError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SchemaError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          f"save the file as UTF-8") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line is not a line of its own
    rows: Rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            raise SchemaError(f"{path}:{lineno}: blank line (the MUGE server rejects a file with a blank line, "
                              f"even one extra newline at the end)")
        rows.append((lineno, json_object_line(line, f"{path}:{lineno}", SchemaError)))
    return rows


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
    pred_rows = _read_rows(pred_path)
    ref_rows = _read_rows(ref_path)
    swapped = is_swapped(pred_rows, ref_rows, k)
    if swapped:
        pred_path, ref_path, pred_rows, ref_rows = ref_path, pred_path, ref_rows, pred_rows
    print(f"reference: {ref_path}; predictions: {pred_path}" +
          (" (told from their content: they were given in the order REF PRED)" if swapped else ""),
          file=sys.stderr)
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
