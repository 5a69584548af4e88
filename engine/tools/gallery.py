"""A self-contained HTML page that shows what retrieval returns: for sample queries, the query text
and its top-k images (thumbnails embedded as data URIs), correct and wrong ones marked by symbol and
colour, the correct images that were not retrieved, with R@k on top; unmarked for a test split.

Pure rendering: the caller hands in predictions, references, query texts and an image lookup, so
the page can be built from any split or store and tested without a browser.
"""
from __future__ import annotations

import base64
import html
import io
import random
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

THUMB_PX = 96


def thumbnail_data_uri(chw_uint8: np.ndarray, size: int = THUMB_PX) -> str:
    """A PNG data URI of a C×H×W uint8 image, scaled down to at most `size` pixels a side."""
    img = Image.fromarray(np.ascontiguousarray(np.transpose(chw_uint8, (1, 2, 0))))
    if max(img.size) > size:
        img.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def choose_queries(query_ids: Sequence[int], n: int, seed: int = 0) -> List[int]:
    """n query ids in a reproducible order (all of them when there are fewer than n)."""
    ids = sorted(query_ids)
    if len(ids) <= n:
        return ids
    return sorted(random.Random(seed).sample(ids, n))


def failed_queries(predictions: Mapping[int, Sequence[int]], references: Mapping[int, Sequence[int]]) -> List[int]:
    """Queries with references whose predictions hold none of them."""
    return [q for q in references if not set(predictions[q]) & set(references[q])]


_STYLE = """
body{font-family:system-ui,"Noto Sans CJK SC","PingFang SC",sans-serif;margin:24px;color:#222}
h1{font-size:20px} table.metrics td,table.metrics th{padding:2px 10px;text-align:right}
.query{margin:18px 0;padding-top:8px;border-top:1px solid #ddd}
.qtext{font-size:18px;margin-bottom:6px} .qmeta{color:#666;font-size:12px}
.row{display:flex;gap:6px;flex-wrap:wrap} .label{font-size:12px;color:#666;margin:6px 0 2px}
figure{margin:0;text-align:center;font-size:11px;color:#555}
figure img{display:block;border:4px solid #c33;border-radius:3px}
figure.hit img{border-color:#2a2} figure.unjudged img{border-color:#bbb}
figure.missed img{border:4px dashed #2a2} .absent{width:96px;height:60px;border:4px dashed #2a2;font-size:11px}
.mark{font-weight:bold;font-size:13px} figure.hit .mark{color:#2a2} figure.miss .mark{color:#c33}
"""

# Marks readable without colour (colour-blind readers, greyscale prints).
HIT_MARK, MISS_MARK, MISSED_MARK = "\u2713", "\u2717", "\u2606"


def _figure(cls: str, image_id: int, caption: str, src: Optional[str]) -> str:
    picture = (f'<img alt="image {image_id}" src="{src}">' if src is not None
               else '<div class="absent">not in the store</div>')
    return f'<figure class="{cls}" data-image-id="{image_id}">{picture}<figcaption>{caption}</figcaption></figure>'


def render_gallery(predictions: Mapping[int, Sequence[int]], references: Mapping[int, Sequence[int]],
                   query_texts: Mapping[int, str], image_lookup: Callable[[int], Optional[np.ndarray]],
                   metrics: Optional[Mapping[str, float]], query_ids: Sequence[int], title: str = "Retrieval gallery",
                   note: str = "") -> str:
    """The page as a string. `metrics` holds percentages (r1, r5, r10, mean_recall), or None with no
    `references` (a test split: results are shown unmarked). `image_lookup(image_id)` returns the
    stored C×H×W uint8 image, or None when the store lacks it. Each judged result carries a symbol
    (✓ correct, ✗ wrong) besides its colour; a query's correct images that were not retrieved follow
    its results (☆, dashed border)."""
    parts: List[str] = [
        "<!DOCTYPE html>", '<html lang="zh"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if metrics is not None:
        parts.append('<table class="metrics"><tr><th>R@1</th><th>R@5</th><th>R@10</th><th>mean recall</th></tr><tr>')
        parts += [f'<td id="{key}">{metrics[key]:.2f}</td>' for key in ("r1", "r5", "r10", "mean_recall")]
        parts.append("</tr></table>")
        legend = (f"{HIT_MARK} green border: a correct image; {MISS_MARK} red: wrong; "
                  f"{MISSED_MARK} dashed: a correct image that was not retrieved.")
    else:
        legend = "No ground truth for these queries (a test split): the results are not marked."
    parts.append(f'<p class="qmeta">{len(query_ids)} queries shown{html.escape(note)}. {legend}</p>')
    thumbs: Dict[int, Optional[str]] = {}

    def thumb(image_id: int) -> Optional[str]:
        if image_id not in thumbs:
            img = image_lookup(image_id)
            thumbs[image_id] = None if img is None else thumbnail_data_uri(img)
        return thumbs[image_id]

    for qid in query_ids:
        judged = qid in references
        correct = set(references.get(qid, ()))
        parts.append(f'<div class="query" data-query-id="{qid}">')
        parts.append(f'<div class="qtext">{html.escape(query_texts[qid])}</div>')
        meta = f"{len(correct)} correct image(s) in the pool" if judged else "no ground truth"
        parts.append(f'<div class="qmeta">query {qid} · {meta}</div>')
        parts.append('<div class="row">')
        for rank, image_id in enumerate(predictions[qid], start=1):
            if not judged:
                cls, mark = "unjudged", ""
            elif image_id in correct:
                cls, mark = "hit", f'<span class="mark">{HIT_MARK}</span> '
            else:
                cls, mark = "miss", f'<span class="mark">{MISS_MARK}</span> '
            parts.append(_figure(cls, image_id, f"{mark}#{rank} · {image_id}", thumb(image_id)))
        parts.append("</div>")
        missed = [i for i in references.get(qid, ()) if i not in set(predictions[qid])]
        if missed:
            parts.append(f'<div class="label">correct, not retrieved in the top {len(predictions[qid])}:</div>'
                         '<div class="row">')
            parts += [_figure("missed", i, f'<span class="mark">{MISSED_MARK}</span> {i}', thumb(i)) for i in missed]
            parts.append("</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
