"""Prediction files, read and written here only.

Text->image (MUGE's): {"query_id": int, "item_ids": [k ints]} per line; reference lines {"query_id":
int, "item_ids": [ints], "query_text": ...}. Chinese-CLIP's names ({"text_id", "image_ids", "text"})
are accepted in both, one schema per file. Image->text (Chinese-CLIP's): {"image_id": int,
"text_ids": [k ints]} ("query_ids" is accepted as the name of the list too); its reference is the
queries file inverted, or Chinese-CLIP's own {"image_id", "text_ids"} form (read_i2t_reference).

Reading is as strict as the MUGE server: UTF-8, one JSON object per line, no blank lines, integer ids
(JSON booleans are not ids), exactly k unique predicted ids, every reference query predicted; a query
predicted twice is an error (the server silently keeps the last line). Writing is atomic.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from data.files import InputError, atomic_write, json_object_line, read_jsonl
from data.queries import is_int

QUERY_KEYS = ("query_id", "text_id")
ITEM_KEYS = ("item_ids", "image_ids")
TEXT_KEYS = ("query_text", "text")

Rows = List[Tuple[int, Dict[str, Any]]]


class SchemaError(InputError):
    """A prediction or reference file breaks the MUGE schema."""


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
    if not is_int(qid):
        raise SchemaError(f"{where}: query id {qid!r} is not an integer (a JSON number without quotes)")
    return qid


def read_rows(path: Path) -> Rows:
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


def check_one_schema(path: Path, rows: Rows) -> str:
    """"MUGE" or "Chinese-CLIP": the id key of the file's first line, which every line must share
    (a file mixing query_id and text_id lines is an error naming the first odd line)."""
    def keys(obj):  # a line with both names is read as MUGE's (_field checks that they agree)
        return ("query_id",) if "query_id" in obj else ("text_id",) if "text_id" in obj else ()

    first = next((keys(obj) for _, obj in rows if keys(obj)), ())
    for lineno, obj in rows:
        if keys(obj) and keys(obj) != first:  # a line without any is the line parser's to report
            raise SchemaError(f"{path}:{lineno}: its id field ({', '.join(keys(obj))}) differs from the other "
                              f"lines' ({', '.join(first)}): write the file in one schema")
    return "Chinese-CLIP" if first == ("text_id",) else "MUGE"


def parse_reference(path: Path, rows: Rows) -> Dict[int, List[int]]:
    reference: Dict[int, List[int]] = {}
    check_one_schema(path, rows)
    for lineno, obj in rows:
        where = f"{path}:{lineno}"
        qid = _query_id(obj, where)
        items = _field(obj, ITEM_KEYS, where, "item ids")
        if not isinstance(items, list) or not all(is_int(i) for i in items):
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
    check_one_schema(path, rows)
    for lineno, obj in rows:
        where = f"{path}:{lineno}"
        qid = _query_id(obj, where)
        items = _field(obj, ITEM_KEYS, where, "predicted item ids")
        if not isinstance(items, list):
            raise SchemaError(f"{where}: the predicted ids of query {qid} are not a list")
        if len(items) != k:
            raise SchemaError(f"{where}: query {qid} has {len(items)} predicted ids, exactly {k} are required")
        for rank, item in enumerate(items, start=1):
            if not is_int(item):
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


I2T_LIST_KEYS = ("text_ids", "query_ids")


def _i2t_line(obj: Dict[str, Any], where: str, k: int) -> Tuple[int, List[int]]:
    image = obj.get("image_id")
    if not is_int(image):
        raise SchemaError(f"{where}: 'image_id' must be an integer, got {image!r}")
    present = [key for key in I2T_LIST_KEYS if key in obj]
    if not present:
        raise SchemaError(f"{where}: no predicted text ids (expected one of {', '.join(I2T_LIST_KEYS)})")
    if len(present) > 1 and obj[present[0]] != obj[present[1]]:
        raise SchemaError(f"{where}: fields {' and '.join(present)} disagree")
    texts = obj[present[0]]
    if not isinstance(texts, list) or not all(is_int(t) for t in texts):
        raise SchemaError(f"{where}: the predicted text ids of image {image} must be a list of integers")
    if len(texts) != k:
        raise SchemaError(f"{where}: image {image} has {len(texts)} predicted text ids, exactly {k} are required")
    if len(set(texts)) != k:
        raise SchemaError(f"{where}: image {image} has duplicate predicted text ids")
    return image, texts


def read_i2t_reference(path) -> Dict[int, List[int]]:
    """Chinese-CLIP's image->text reference ({split}_texts.tr.jsonl, made by its
    transform_ir_annotation_to_tr.py): {"image_id": i, "text_ids": [ids]} per line."""
    refs: Dict[int, List[int]] = {}
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        image, texts = obj.get("image_id"), obj.get("text_ids")
        if not is_int(image):
            raise SchemaError(f"{where}: 'image_id' must be an integer, got {image!r}")
        if not isinstance(texts, list) or not texts or not all(is_int(t) for t in texts):
            raise SchemaError(f"{where}: 'text_ids' of image {image} must be a non-empty list of integers")
        if image in refs:
            raise SchemaError(f"{where}: image {image} appears twice in the reference")
        refs[image] = texts
    if not refs:
        raise SchemaError(f"{path}: the reference holds no images")
    return refs


def parse_i2t_predictions(path, references: Dict[int, List[int]], k: int = 10
                          ) -> Tuple[Dict[int, List[int]], int]:
    """(predictions of the referenced images, count of predicted images outside the reference)."""
    predictions: Dict[int, List[int]] = {}
    seen = set()
    ignored = 0
    for lineno, obj in read_jsonl(path):
        image, texts = _i2t_line(obj, f"{path}:{lineno}", k)
        if image in seen:
            raise SchemaError(f"{path}:{lineno}: image {image} is predicted twice")
        seen.add(image)
        if image in references:
            predictions[image] = texts
        else:
            ignored += 1
    missing = [i for i in references if i not in predictions]
    if missing:
        shown = ", ".join(str(i) for i in missing[:20]) + (", ..." if len(missing) > 20 else "")
        raise SchemaError(f"{path}: {len(missing)} images listed by the queries have no prediction: {shown}")
    return predictions, ignored


def write_predictions(path, query_ids: np.ndarray, item_ids: np.ndarray, query_key: str = "query_id",
                      item_key: str = "item_ids") -> None:
    """MUGE prediction jsonl, {"query_id": q, "item_ids": [k ints]} per line, atomically (other
    keys for image->text: {"image_id": i, "text_ids": [k ints]})."""
    with atomic_write(path, "w") as f:
        for q, items in zip(np.asarray(query_ids).tolist(), np.asarray(item_ids).tolist()):
            f.write(json.dumps({query_key: q, item_key: items}) + "\n")
