"""A self-contained HTML page that shows what retrieval returns: for sample queries, the query text
and its top-k images (thumbnails embedded as data URIs), correct ones marked, with R@k on top.

Pure rendering: the caller hands in predictions, references, query texts and an image lookup, so
the page can be built from any split or store and tested without a browser.
"""
from __future__ import annotations

import base64
import html
import io
import random
from typing import Callable, Dict, List, Mapping, Sequence

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


_STYLE = """
body{font-family:system-ui,"Noto Sans CJK SC","PingFang SC",sans-serif;margin:24px;color:#222}
h1{font-size:20px} table.metrics td,table.metrics th{padding:2px 10px;text-align:right}
.query{margin:18px 0;padding-top:8px;border-top:1px solid #ddd}
.qtext{font-size:18px;margin-bottom:6px} .qmeta{color:#666;font-size:12px}
.row{display:flex;gap:6px;flex-wrap:wrap}
figure{margin:0;text-align:center;font-size:11px;color:#555}
figure img{display:block;border:4px solid #c33;border-radius:3px}
figure.hit img{border-color:#2a2}
"""


def render_gallery(predictions: Mapping[int, Sequence[int]], references: Mapping[int, Sequence[int]],
                   query_texts: Mapping[int, str], image_lookup: Callable[[int], np.ndarray],
                   metrics: Mapping[str, float], query_ids: Sequence[int], title: str = "Retrieval gallery") -> str:
    """The page as a string. `metrics` holds percentages (r1, r5, r10, mean_recall);
    `image_lookup(image_id)` returns the stored C×H×W uint8 image."""
    parts: List[str] = [
        "<!DOCTYPE html>", '<html lang="zh"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<table class="metrics"><tr><th>R@1</th><th>R@5</th><th>R@10</th><th>mean recall</th></tr><tr>',
    ]
    parts += [f'<td id="{key}">{metrics[key]:.2f}</td>' for key in ("r1", "r5", "r10", "mean_recall")]
    parts.append(f"</tr></table><p class=\"qmeta\">{len(query_ids)} sample queries; "
                 "green border: a correct image, red: wrong.</p>")
    thumbs: Dict[int, str] = {}
    for qid in query_ids:
        correct = set(references.get(qid, ()))
        parts.append(f'<div class="query" data-query-id="{qid}">')
        parts.append(f'<div class="qtext">{html.escape(query_texts[qid])}</div>')
        parts.append(f'<div class="qmeta">query {qid} · {len(correct)} correct image(s) in the pool</div>')
        parts.append('<div class="row">')
        for rank, image_id in enumerate(predictions[qid], start=1):
            if image_id not in thumbs:
                thumbs[image_id] = thumbnail_data_uri(image_lookup(image_id))
            hit = image_id in correct
            parts.append(f'<figure class="{"hit" if hit else "miss"}" data-image-id="{image_id}">'
                         f'<img alt="image {image_id}" src="{thumbs[image_id]}">'
                         f"<figcaption>#{rank} · {image_id}</figcaption></figure>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)
