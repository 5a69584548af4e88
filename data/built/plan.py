"""The queries file of a built data set read into pair arrays (no object per pair), and its distinct
texts tokenized in parallel. Every shard job reads the same plan; layout.py says what the shards hold.
"""
from __future__ import annotations

import array
import math
import multiprocessing as mp
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np

from data.files import InputError, read_jsonl
from data.queries import FileSchema
from data.tokenizer import load_tokenizer, tokenize


@dataclass
class Plan:
    """Every pair of the queries file as arrays (no object per pair), in file order."""
    query_ids: np.ndarray    # int64 [Q]
    query_lines: np.ndarray  # int64 [Q]
    query_text: np.ndarray   # int64 [Q]: index into texts
    texts: List[str]         # distinct texts
    pair_query: np.ndarray   # int64 [N]: query row of each pair
    pair_image: np.ndarray   # int64 [N]: image id of each pair
    schema: str = "muge"     # the queries file's schema (data.queries.SCHEMAS)


def read_plan(queries: Path, progress: bool = True) -> Plan:
    from tqdm import tqdm

    qids, lines, qtext, pq, pimg = (array.array("q") for _ in range(5))
    text_index: Dict[str, int] = {}
    schema = FileSchema(queries)
    # `with`: a bad line closes the bar first, so the error starts a line of its own
    with tqdm(desc=f"read {queries.name}", unit=" queries", disable=not progress, file=sys.stderr,
              mininterval=2.0, dynamic_ncols=True) as bar:
        for lineno, obj in read_jsonl(queries):
            qid, text, items = schema.parse(obj, lineno)
            if not items:
                raise InputError(f"{queries}:{lineno}: query {qid} has no item_ids/image_ids; training needs "
                                 f"at least one image per query")
            row = len(qids)
            qids.append(qid)
            lines.append(lineno)
            qtext.append(text_index.setdefault(text, len(text_index)))
            pq.extend([row] * len(items))
            pimg.extend(items)
            bar.update(1)
    if not qids:
        raise InputError(f"{queries}: no queries in the file")
    plan = Plan(*(np.frombuffer(a, dtype=np.int64) for a in (qids, lines, qtext)), list(text_index),
                np.frombuffer(pq, dtype=np.int64), np.frombuffer(pimg, dtype=np.int64), schema.schema)
    _check_unique_queries(plan, queries)
    return plan


def _check_unique_queries(plan: Plan, queries: Path) -> None:
    order = np.argsort(plan.query_ids, kind="stable")
    same = np.nonzero(plan.query_ids[order][1:] == plan.query_ids[order][:-1])[0]
    if same.size:
        first, again = order[same[0]], order[same[0] + 1]
        raise InputError(f"{queries}:{plan.query_lines[again]}: query_id {plan.query_ids[again]} repeats "
                         f"line {plan.query_lines[first]}")


def num_shards_for(plan: Plan, shard_size: int) -> int:
    return max(1, math.ceil(np.unique(plan.pair_image).size / shard_size))


# ---- tokenizing ------------------------------------------------------------------------------

_TOKENIZER = None


def _tokenizer_init(vocab: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(vocab)


def _tokenize_chunk(args) -> np.ndarray:
    texts, context_length = args
    return tokenize(_TOKENIZER, texts, context_length).numpy().astype(np.int32)


def tokenize_texts(texts: List[str], vocab, context_length: int, workers: int, progress: bool,
                   chunk: int = 2048) -> np.ndarray:
    """int32 [len(texts), L] token ids, tokenized in `workers` processes (in order)."""
    from tqdm import tqdm

    parts = [(texts[i:i + chunk], context_length) for i in range(0, len(texts), chunk)]
    out = []
    with tqdm(total=len(texts), desc="tokenize", unit=" texts", disable=not progress, file=sys.stderr,
              mininterval=2.0, dynamic_ncols=True) as bar:
        if workers > 1 and len(parts) > 1:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ctx.Pool(workers, initializer=_tokenizer_init, initargs=(str(vocab),)) as pool:
                for arr in pool.imap(_tokenize_chunk, parts):
                    out.append(arr)
                    bar.update(len(arr))
        else:
            _tokenizer_init(str(vocab))
            for p in parts:
                out.append(_tokenize_chunk(p))
                bar.update(len(out[-1]))
    return np.concatenate(out) if out else np.zeros((0, context_length), dtype=np.int32)
