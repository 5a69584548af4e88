"""MUGE query files -> queries and (text, image id) training pairs, with errors that name the line.

A line: {"query_id": 248816, "query_text": "圣诞 抱枕", "item_ids": [1006938]}. Test files may omit
item_ids (MUGE's test set has no answers); training needs them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, Tuple, Union

from data.files import InputError, read_jsonl

PathLike = Union[str, os.PathLike]


@dataclass
class Query:
    query_id: int
    text: str
    item_ids: List[int]
    where: str = field(default="", compare=False)  # "file:line", for later error messages


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_query(obj: dict, where: str) -> Tuple[int, str, List[int]]:
    """(query id, text, item ids) of one jsonl object; InputError naming `where` if malformed."""
    qid = obj.get("query_id")
    if not is_int(qid):
        raise InputError(f"{where}: 'query_id' must be an integer, got {qid!r}")
    text = obj.get("query_text")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: 'query_text' must be a non-empty string, got {text!r}")
    items = obj.get("item_ids", [])
    if items is None:
        items = []
    if not isinstance(items, list) or not all(is_int(i) for i in items):
        raise InputError(f"{where}: 'item_ids' must be a list of integers, got {items!r}")
    return qid, text, items


def read_queries(path: PathLike) -> List[Query]:
    """Every query of a MUGE `*_queries.jsonl`; InputError with file:line on a malformed line."""
    path = Path(path)
    out: List[Query] = []
    first_line = {}
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        qid, text, items = parse_query(obj, where)
        if qid in first_line:
            raise InputError(f"{where}: query_id {qid} repeats line {first_line[qid]}")
        first_line[qid] = lineno
        out.append(Query(qid, text, list(items), where))
    if not out:
        raise InputError(f"{path}: no queries in the file")
    return out


def training_pairs(queries: Sequence[Query]) -> List[Tuple[str, int]]:
    """One (text, image id) per (query, image): a query with three images gives three samples."""
    pairs = []
    for q in queries:
        if not q.item_ids:
            raise InputError(f"{q.where or 'query'}: query {q.query_id} has no item_ids; "
                             f"training needs at least one image per query")
        pairs.extend((q.text, int(i)) for i in q.item_ids)
    return pairs


def check_ids_present(queries_or_pairs, store, source_path: PathLike = "") -> None:
    """Fail at start-up, not mid-epoch, when an image id is missing from the store."""
    ids = []
    owner = {}
    for x in queries_or_pairs:
        if isinstance(x, Query):
            for i in x.item_ids:
                ids.append(i)
                owner.setdefault(i, x.where or f"query {x.query_id}")
        else:
            ids.append(int(x[1]))
    missing = store.missing(ids)
    if missing:
        shown = ", ".join(f"{i}" + (f" ({owner[i]})" if i in owner else "") for i in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise InputError(f"{source_path or 'queries'}: {len(missing)} image id(s) are not in the image "
                         f"store {getattr(store, 'path', store)}: {shown}{more}")
