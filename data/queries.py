"""Queries files -> queries and (text, image id) training pairs, with errors that name the line.

Two schemas, told apart per file by its first line (`FileSchema`); a file mixing them is an error
naming the line that breaks the file's schema:
  MUGE:         {"query_id": 248816, "query_text": "圣诞 抱枕", "item_ids": [1006938]}
  Chinese-CLIP: {"text_id": 8428, "text": "高级感托特包斜挎", "image_ids": [1076345, 517602]}
                (its MUGE, Flickr30K-CN and COCO-CN packages' {split}_texts.jsonl)
Test files may omit the image list (MUGE's test set has no answers); training needs it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

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


# schema -> (id key, text key, image-list key)
SCHEMAS: Dict[str, Tuple[str, str, str]] = {"muge": ("query_id", "query_text", "item_ids"),
                                            "chinese-clip": ("text_id", "text", "image_ids")}
SCHEMA_TITLES = {"muge": "MUGE", "chinese-clip": "Chinese-CLIP"}


def line_schema(obj: dict, where: str) -> str:
    """The schema one jsonl object is written in, by its id key."""
    found = [name for name, keys in SCHEMAS.items() if keys[0] in obj]
    if len(found) != 1:
        what = "both 'query_id' and 'text_id'" if found else "neither 'query_id' (MUGE) nor 'text_id' (Chinese-CLIP)"
        raise InputError(f"{where}: {what}: a queries line has one of them")
    return found[0]


def describe_schema(path: PathLike, schema: str) -> str:
    """The line a tool prints once per queries file it reads."""
    return f"{path}: {SCHEMA_TITLES[schema]} schema ({', '.join(SCHEMAS[schema])})"


def queries_schema(path: PathLike) -> str:
    """The schema of a queries file, from its first line (reading the whole file checks the rest)."""
    for lineno, obj in read_jsonl(path):
        return line_schema(obj, f"{path}:{lineno}")
    raise InputError(f"{path}: no queries in the file")


class FileSchema:
    """The schema of one queries file: its first line's, which every later line must share."""

    def __init__(self, path: PathLike):
        self.path, self.schema, self.first_line = Path(path), None, 0

    def parse(self, obj: dict, lineno: int) -> Tuple[int, str, List[int]]:
        where = f"{self.path}:{lineno}"
        schema = line_schema(obj, where)
        if self.schema is None:
            self.schema, self.first_line = schema, lineno
        elif schema != self.schema:
            raise InputError(f"{where}: a {SCHEMA_TITLES[schema]} line ({SCHEMAS[schema][0]}) in a file of "
                             f"{SCHEMA_TITLES[self.schema]} lines ({SCHEMAS[self.schema][0]}, from line "
                             f"{self.first_line}): write the file in one schema")
        return parse_query(obj, where, schema)


def parse_query(obj: dict, where: str, schema: str = "muge") -> Tuple[int, str, List[int]]:
    """(id, text, image ids) of one jsonl object in `schema`; InputError naming `where` if malformed."""
    id_key, text_key, items_key = SCHEMAS[schema]
    qid = obj.get(id_key)
    if not is_int(qid):
        raise InputError(f"{where}: '{id_key}' must be an integer, got {qid!r}")
    text = obj.get(text_key)
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: '{text_key}' must be a non-empty string, got {text!r}")
    items = obj.get(items_key, [])
    if items is None:
        items = []
    if not isinstance(items, list) or not all(is_int(i) for i in items):
        raise InputError(f"{where}: '{items_key}' must be a list of integers, got {items!r}")
    return qid, text, items


class Queries(list):
    """The queries of one file (a list of Query) and the schema it is written in."""
    schema: str = "muge"


def read_queries(path: PathLike) -> Queries:
    """Every query of a MUGE `*_queries.jsonl` or a Chinese-CLIP `*_texts.jsonl` (`.schema` says
    which); InputError with file:line on a malformed line or a line in the other schema."""
    path = Path(path)
    out = Queries()
    first_line = {}
    schema = FileSchema(path)
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        qid, text, items = schema.parse(obj, lineno)
        if qid in first_line:
            raise InputError(f"{where}: {SCHEMAS[schema.schema][0]} {qid} repeats line {first_line[qid]}")
        first_line[qid] = lineno
        out.append(Query(qid, text, list(items), where))
    if not out:
        raise InputError(f"{path}: no queries in the file")
    out.schema = schema.schema
    return out


def training_pairs(queries: Sequence[Query]) -> List[Tuple[str, int]]:
    """One (text, image id) per (query, image): a query with three images gives three samples."""
    pairs = []
    for q in queries:
        if not q.item_ids:
            raise InputError(f"{q.where or 'query'}: query {q.query_id} has no item_ids/image_ids; "
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
