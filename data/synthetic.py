"""A small MUGE-format data set that a tiny CLIP can learn in minutes on a CPU.

Each 64×64 image holds one coloured shape in one cell of a 3×3 grid (with jitter in place, size and
tint); its caption names colour, position and shape, e.g. 左上角的红色圆形. To retrieve the right
images a model must read all three: 8 colours × 6 shapes × 9 positions = 432 descriptions.
Train: one caption query per image (train pairs = train images). Valid/test: one query per distinct
description present in the split, whose item_ids are all images that match it (several each, as in
MUGE). Everything is derived from (seed, split, index), so the output is byte-identical for a seed
whatever the number of worker processes.
"""
from __future__ import annotations

import base64
import io
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from data.files import atomic_write

PathLike = Union[str, os.PathLike]

COLOURS: List[Tuple[str, Tuple[int, int, int]]] = [
    ("红色", (220, 40, 40)), ("橙色", (245, 140, 20)), ("黄色", (235, 225, 40)), ("绿色", (40, 175, 60)),
    ("青色", (40, 205, 215)), ("蓝色", (45, 80, 225)), ("紫色", (155, 60, 205)), ("白色", (240, 240, 240)),
]
# Shapes chosen to differ in outline or fill at 64 px (a ring is hollow, a rectangle is 2:1).
SHAPES = ["圆形", "正方形", "三角形", "十字形", "圆环", "长方形"]
POSITIONS = ["左上角", "正上方", "右上角", "左侧", "正中间", "右侧", "左下角", "正下方", "右下角"]
TEMPLATES = ["{p}的{c}{s}", "{p}有一个{c}{s}", "{c}{s}在{p}"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPLITS = ("train", "valid", "test")
IMAGE_ID_BASE = {"train": 1_000_000, "valid": 2_000_000, "test": 3_000_000}
QUERY_ID_BASE = {"train": 10_000_000, "valid": 20_000_000, "test": 30_000_000}
DEFAULT_SIZES = {"train": 20_000, "valid": 1_500, "test": 1_500}
N_COMBOS = len(COLOURS) * len(SHAPES) * len(POSITIONS)
MIN_IMAGES_PER_QUERY = 3  # valid/test: each query has at least this many correct images when n allows
SUPERSAMPLE = 4  # draw at 4× and downscale: smooth edges, as a photo would have


def combo_parts(combo: int) -> Tuple[int, int, int]:
    """combo index -> (colour, shape, position) indices."""
    c, rest = divmod(combo, len(SHAPES) * len(POSITIONS))
    s, p = divmod(rest, len(POSITIONS))
    return c, s, p


def caption(combo: int, template: int = 0) -> str:
    c, s, p = combo_parts(combo)
    return TEMPLATES[template].format(p=POSITIONS[p], c=COLOURS[c][0], s=SHAPES[s])


def vocab_tokens() -> List[str]:
    """BERT's special tokens, then every character any caption can contain (BertTokenizer splits
    CJK text into single characters)."""
    chars = set()
    for words in ([c for c, _ in COLOURS], SHAPES, POSITIONS, [t.format(p="", c="", s="") for t in TEMPLATES]):
        for w in words:
            chars.update(w)
    return SPECIAL_TOKENS + sorted(chars)


def draw_image(combo: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    c, s, p = combo_parts(combo)
    big = size * SUPERSAMPLE
    cell = big / 3.0
    bg = tuple(int(v) for v in rng.integers(15, 60) + rng.integers(-8, 9, size=3))
    img = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(img)
    row, col = divmod(p, 3)
    cx = (col + 0.5 + rng.uniform(-0.12, 0.12)) * cell
    cy = (row + 0.5 + rng.uniform(-0.12, 0.12)) * cell
    r = rng.uniform(0.34, 0.42) * cell
    colour = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLOURS[c][1])
    shape = SHAPES[s]
    if shape == "圆形":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "正方形":
        h = 0.85 * r
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour)
    elif shape == "三角形":
        R = 1.15 * r
        d.polygon([(cx, cy - R), (cx - R * 0.866, cy + R * 0.5), (cx + R * 0.866, cy + R * 0.5)], fill=colour)
    elif shape == "十字形":
        t = 0.32 * r
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
    elif shape == "圆环":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        q = 0.55 * r
        d.ellipse([cx - q, cy - q, cx + q, cy + q], fill=bg)
    elif shape == "长方形":
        w, h = 1.15 * r, 0.5 * r
        d.rectangle([cx - w, cy - h, cx + w, cy + h], fill=colour)
    else:  # pragma: no cover - SHAPES and this function change together
        raise AssertionError(shape)
    return img.resize((size, size), Image.LANCZOS)


def encode_jpeg_b64(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, subsampling=0)
    return base64.urlsafe_b64encode(buf.getvalue())  # MUGE's files use the URL-safe alphabet


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _render_chunk(args) -> List[bytes]:
    seed, split, start, combos, size = args
    lines = []
    for k, combo in enumerate(combos):
        i = start + k
        img = draw_image(int(combo), _image_rng(seed, split, i), size)
        lines.append(b"%d\t%s\n" % (IMAGE_ID_BASE[split] + i, encode_jpeg_b64(img)))
    return lines


def assign_combos(seed: int, split: str, n: int) -> np.ndarray:
    """Train: a uniform random description per image. Valid/test: descriptions dealt out evenly
    (a shuffled round robin), so every query of those splits has several correct images; a split
    too small to hold every description at least MIN_IMAGES_PER_QUERY times uses fewer of them."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 1 << 40])
    if split == "train":
        return rng.integers(0, N_COMBOS, size=n)
    used = rng.permutation(N_COMBOS)[: min(N_COMBOS, max(1, n // MIN_IMAGES_PER_QUERY))]
    rounds = -(-n // len(used))
    return np.concatenate([rng.permutation(used) for _ in range(rounds)])[:n]


def make_queries(seed: int, split: str, combos: np.ndarray) -> List[Dict]:
    rng = np.random.default_rng([seed, SPLITS.index(split), 1 << 41])
    base_img, base_q = IMAGE_ID_BASE[split], QUERY_ID_BASE[split]
    if split == "train":
        templates = rng.integers(0, len(TEMPLATES), size=len(combos))
        return [{"query_id": base_q + i, "query_text": caption(int(c), int(t)), "item_ids": [base_img + i]}
                for i, (c, t) in enumerate(zip(combos, templates))]
    by_combo: Dict[int, List[int]] = {}
    for i, c in enumerate(combos):
        by_combo.setdefault(int(c), []).append(base_img + i)
    present = sorted(by_combo)
    templates = rng.integers(0, len(TEMPLATES), size=len(present))
    return [{"query_id": base_q + n, "query_text": caption(c, int(t)), "item_ids": by_combo[c]}
            for n, (c, t) in enumerate(zip(present, templates))]


def make_synthetic(out: PathLike, seed: int = 0, sizes: Optional[Dict[str, int]] = None,
                   image_size: int = 64, workers: Optional[int] = None, progress: bool = True) -> Dict:
    """Write {split}_imgs.tsv, {split}_queries.jsonl, vocab.txt and meta.json under `out`."""
    from tqdm import tqdm

    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    for split, n in sizes.items():
        if split not in SPLITS or not 0 < n < 1_000_000:
            raise ValueError(f"bad size for split {split!r}: {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    pool = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers) \
        if workers > 1 else None
    counts = {}
    try:
        for split in SPLITS:
            n = sizes[split]
            combos = assign_combos(seed, split, n)
            step = 500
            jobs = [(seed, split, s, combos[s:s + step].tolist(), image_size) for s in range(0, n, step)]
            results = pool.imap(_render_chunk, jobs) if pool else map(_render_chunk, jobs)
            with atomic_write(out / f"{split}_imgs.tsv", "wb") as f, \
                    tqdm(total=n, desc=f"synthetic {split}", unit="img", disable=not progress,
                         file=sys.stderr) as bar:
                for lines in results:
                    f.writelines(lines)
                    bar.update(len(lines))
            queries = make_queries(seed, split, combos)
            with atomic_write(out / f"{split}_queries.jsonl") as f:
                for q in queries:
                    f.write(json.dumps(q, ensure_ascii=False) + "\n")
            counts[split] = {"images": n, "queries": len(queries),
                             "pairs": sum(len(q["item_ids"]) for q in queries)}
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    with atomic_write(out / "vocab.txt") as f:
        f.write("\n".join(vocab_tokens()) + "\n")
    meta = {"generator": "data.synthetic", "seed": seed, "image_size": image_size, "counts": counts,
            "colours": [c for c, _ in COLOURS], "shapes": SHAPES, "positions": POSITIONS,
            "templates": TEMPLATES, "image_id_base": IMAGE_ID_BASE, "query_id_base": QUERY_ID_BASE}
    with atomic_write(out / "meta.json") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    return meta
