"""Score text->image, image->text or both from prediction files and one queries file.

Text->image predictions are MUGE's ({"query_id", "item_ids": [k]}) and are read and checked by
engine.scoring.predictions and scored by engine.scoring.muge, so that direction scores exactly what
MUGE mode scores. Image->text predictions
are Chinese-CLIP's ({"image_id": i, "text_ids": [k query ids]}; "query_ids" is accepted as the
name of the list too), checked as strictly: integer ids, exactly k unique ids, every scored image
predicted once. The image->text reference is the queries file inverted (engine.scoring.recall):
images that no query lists are not scored, and predictions for them are counted and ignored.

Result JSON: {"success", "mode", "score", "scoreJson": {"score", "mean_recall", "t2i": {r1, r5,
r10, mean_recall, queries}, "i2t": {r1, r5, r10, mean_recall, images, ignored_images}}} with the
directions the mode asks for; "mean_recall" is the mean of the six R@k in mode both.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from data.files import EXIT_BAD_INPUT, InputError, atomic_write, read_jsonl
from data.queries import read_queries
from engine.scoring.muge import evaluate as evaluate_muge, result_json as muge_result_json
from engine.scoring.predictions import SchemaError, parse_i2t_predictions, read_i2t_reference
from engine.scoring.recall import combine, direction_scores, invert_references

MODES = ("t2i", "i2t", "both")
def image_references(ref_path) -> Dict[int, List[int]]:
    """{image id: [ids of the queries listing it]} from a queries file (MUGE's or Chinese-CLIP's),
    or Chinese-CLIP's image->text reference ({"image_id", "text_ids"} lines) as it is."""
    first = next(read_jsonl(ref_path), (0, {}))[1]
    if "image_id" in first and "text_ids" in first:
        return read_i2t_reference(ref_path)
    refs = invert_references({q.query_id: q.item_ids for q in read_queries(ref_path) if q.item_ids})
    if not refs:
        raise SchemaError(f"{ref_path}: no query lists an image (item_ids), nothing to score image->text")
    return refs


def score_i2t(pred_path, ref_path, k: int = 10) -> Dict[str, float]:
    refs = image_references(ref_path)
    predictions, ignored = parse_i2t_predictions(pred_path, refs, k)
    return {**direction_scores(predictions, refs), "images": len(refs), "ignored_images": ignored}


def score_t2i(pred_path, ref_path, k: int = 10) -> Dict[str, float]:
    scores = evaluate_muge(pred_path, ref_path, k)
    n = sum(1 for _ in read_jsonl(ref_path))
    return {**scores, "queries": n}


def evaluate_directions(mode: str, ref_path, t2i_pred=None, i2t_pred=None, k: int = 10) -> Dict[str, Any]:
    """scoreJson for `mode` (t2i, i2t or both); InputError on a bad or missing file."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out: Dict[str, Any] = {}
    if mode in ("t2i", "both"):
        out["t2i"] = score_t2i(Path(t2i_pred), ref_path, k)
    if mode in ("i2t", "both"):
        out["i2t"] = score_i2t(Path(i2t_pred), ref_path, k)
    mean = combine(out["t2i"], out["i2t"]) if mode == "both" else out[mode]["mean_recall"]
    return {"score": mean, "mean_recall": mean, **out}


def run(mode: str, ref_path, out_path, t2i_pred=None, i2t_pred=None, k: int = 10) -> int:
    """Evaluate and write the result JSON atomically; 0, or EXIT_BAD_INPUT with success=false."""
    try:
        score_json = evaluate_directions(mode, ref_path, t2i_pred, i2t_pred, k)
        result: Dict[str, Any] = {"success": True, "mode": mode, "score": score_json["score"],
                                  "scoreJson": score_json}
        code = 0
    except InputError as e:
        result = {**muge_result_json(error=str(e)), "mode": mode}
        code = EXIT_BAD_INPUT
    with atomic_write(out_path) as f:
        json.dump(result, f, ensure_ascii=False, indent=2)
        f.write("\n")
    return code


def summary(result: Dict[str, Any]) -> str:
    """One printed line per direction, and the combined mean in mode both."""
    s = result["scoreJson"]
    lines = []
    for d, name in (("t2i", "text->image"), ("i2t", "image->text")):
        if d in s:
            x = s[d]
            extra = f", {x['ignored_images']} predicted images listed by no query ignored" \
                if x.get("ignored_images") else ""
            lines.append(f"{name}: mean recall {x['mean_recall']:.2f} (R@1 {x['r1']:.2f} R@5 {x['r5']:.2f} "
                         f"R@10 {x['r10']:.2f}) over {x.get('queries', x.get('images'))} "
                         f"{'queries' if d == 't2i' else 'images'}{extra}")
    if "t2i" in s and "i2t" in s:
        lines.append(f"both directions: mean recall {s['mean_recall']:.2f}")
    return "\n".join(lines)
