"""A small MUGE-format data set that a tiny CLIP can learn in minutes on a CPU.

Each 64×64 image holds one coloured shape in one cell of a 3×3 grid (with jitter in place, size and
tint); its caption names colour, position and shape, e.g. 左上角的红色圆形. To retrieve the right
images a model must read all three: 8 colours × 6 shapes × 9 positions = 432 descriptions.
Train: one caption query per image (train pairs = train images). Valid/test: one query per distinct
description present in the split, whose item_ids are all images that match it (several each, as in
MUGE). Everything is derived from (seed, split, index), so the output is byte-identical for a seed
whatever the number of worker processes.

Held-out compositions (optional, to measure generalisation instead of memorisation): some colour ×
shape × position cells never appear in training (neither captions nor images; every colour-shape,
colour-position and shape-position pair still does), and some caption phrasings (HELDOUT_TEMPLATES,
made of characters training does see) are used only in valid/test. Valid/test then hold the held-out
cells first, then their near misses (images differing in one attribute) as distractors, and their
queries are also written per category: {split}_queries_{seen,heldout_cells,heldout_phrasings}.jsonl.
Zero-shot labels: {split}_labels_{colour,shape}.jsonl ({"image_id", "label"}) and
classes_{colour,shape}.txt, plus zeroshot_templates.txt (prompts in the captions' style).
"""
from __future__ import annotations

import base64
import io
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

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
# Phrasings kept out of training by --holdout-phrasings: new word orders of characters training sees.
HELDOUT_TEMPLATES = ["有一个{c}{s}在{p}", "{p}有{c}{s}"]
# Zero-shot prompts for the synthetic classes, in the captions' style (the vocabulary has no other
# characters): "{}" is the class name.
SYNTHETIC_ZEROSHOT_TEMPLATES = ["{}", "有一个{}", "一个{}"]
QUERY_CATEGORIES = ("seen", "heldout_cells", "heldout_phrasings")
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
    templates = [t.format(p="", c="", s="") for t in TEMPLATES + HELDOUT_TEMPLATES]
    for words in ([c for c, _ in COLOURS], SHAPES, POSITIONS, templates):
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


def combo_of(c: int, s: int, p: int) -> int:
    return (c * len(SHAPES) + s) * len(POSITIONS) + p


def neighbours(combo: int) -> List[int]:
    """The descriptions that differ from `combo` in exactly one attribute (near-miss distractors)."""
    c, s, p = combo_parts(combo)
    return ([combo_of(x, s, p) for x in range(len(COLOURS)) if x != c]
            + [combo_of(c, x, p) for x in range(len(SHAPES)) if x != s]
            + [combo_of(c, s, x) for x in range(len(POSITIONS)) if x != p])


def holdout_cells(seed: int, n: int) -> List[int]:
    """n colour × shape × position cells to keep out of training, chosen at random but so that
    every colour-shape, colour-position and shape-position pair keeps at least one training cell
    (a model can then compose the held-out cell from parts it has seen). Sorted combo indices."""
    if not 0 <= n <= N_COMBOS // 2:
        raise ValueError(f"holdout cells must be between 0 and {N_COMBOS // 2}, got {n}")
    left: Dict[Tuple[str, int, int], int] = {}
    for combo in range(N_COMBOS):
        for key in _pairs(combo):
            left[key] = left.get(key, 0) + 1
    chosen = []
    for combo in np.random.default_rng([seed, 1 << 42]).permutation(N_COMBOS).tolist():
        if len(chosen) == n:
            break
        if all(left[key] > 1 for key in _pairs(combo)):
            for key in _pairs(combo):
                left[key] -= 1
            chosen.append(combo)
    if len(chosen) < n:
        raise ValueError(f"cannot hold out {n} cells and keep every attribute pair in training")
    return sorted(chosen)


def _pairs(combo: int) -> List[Tuple[str, int, int]]:
    c, s, p = combo_parts(combo)
    return [("cs", c, s), ("cp", c, p), ("sp", s, p)]


def assign_combos(seed: int, split: str, n: int, heldout: Sequence[int] = ()) -> np.ndarray:
    """Train: a uniform random description per image (none of the held-out cells). Valid/test:
    descriptions dealt out evenly (a shuffled round robin), so every query of those splits has
    several correct images; a split too small to hold every description at least
    MIN_IMAGES_PER_QUERY times uses fewer of them: the held-out cells first, then their near
    misses, then the rest."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 1 << 40])
    if split == "train":
        if not heldout:
            return rng.integers(0, N_COMBOS, size=n)
        allowed = np.setdiff1d(np.arange(N_COMBOS), np.asarray(heldout))
        return allowed[rng.integers(0, len(allowed), size=n)]
    m = min(N_COMBOS, max(1, n // MIN_IMAGES_PER_QUERY))
    if heldout:
        held = rng.permutation(np.asarray(heldout)).tolist()
        # near misses dealt round robin over the held-out cells, so each gets its share
        lists = [rng.permutation(neighbours(h)).tolist() for h in held]
        near = list(dict.fromkeys(x for rnd in zip(*lists) for x in rnd if x not in set(held)))
        rest = rng.permutation(sorted(set(range(N_COMBOS)) - set(held) - set(near))).tolist()
        used = np.asarray(held + near + rest)[:m]
    else:
        used = rng.permutation(N_COMBOS)[:m]
    rounds = -(-n // len(used))
    return np.concatenate([rng.permutation(used) for _ in range(rounds)])[:n]


def make_queries(seed: int, split: str, combos: np.ndarray, heldout: Sequence[int] = (),
                 heldout_phrasings: bool = False) -> List[Dict]:
    """The split's queries. Valid/test queries also carry a "category" (seen, heldout_cells or
    heldout_phrasings), which make_synthetic strips before writing the MUGE file."""
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
    held = set(heldout)
    templates = rng.integers(0, len(TEMPLATES), size=len(present))
    out = [{"query_id": base_q + n, "query_text": caption(c, int(t)), "item_ids": by_combo[c],
            "category": "heldout_cells" if c in held else "seen"}
           for n, (c, t) in enumerate(zip(present, templates))]
    if heldout_phrasings:  # the seen cells once more, each in a phrasing training never uses
        seen = [c for c in present if c not in held]
        extra = rng.integers(0, len(HELDOUT_TEMPLATES), size=len(seen))
        for combo, t in zip(seen, extra):
            c, s, p = combo_parts(combo)
            text = HELDOUT_TEMPLATES[int(t)].format(p=POSITIONS[p], c=COLOURS[c][0], s=SHAPES[s])
            out.append({"query_id": base_q + len(out), "query_text": text, "item_ids": by_combo[combo],
                        "category": "heldout_phrasings"})
    return out


def _write_jsonl(path: Path, rows) -> None:
    with atomic_write(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_labels(out: Path, split: str, combos: np.ndarray) -> None:
    """Zero-shot labels of every image of the split: colour and shape class names."""
    base = IMAGE_ID_BASE[split]
    parts = [combo_parts(int(c)) for c in combos]
    _write_jsonl(out / f"{split}_labels_colour.jsonl",
                 ({"image_id": base + i, "label": COLOURS[c][0]} for i, (c, _, _) in enumerate(parts)))
    _write_jsonl(out / f"{split}_labels_shape.jsonl",
                 ({"image_id": base + i, "label": SHAPES[s]} for i, (_, s, _) in enumerate(parts)))


def make_synthetic(out: PathLike, seed: int = 0, sizes: Optional[Dict[str, int]] = None,
                   image_size: int = 64, workers: Optional[int] = None, progress: bool = True,
                   holdout: int = 0, holdout_phrasings: bool = False) -> Dict:
    """Write {split}_imgs.tsv, {split}_queries.jsonl, the label files, vocab.txt and meta.json
    under `out`; with `holdout` cells or `holdout_phrasings` also the per-category query files."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    for split, n in sizes.items():
        if split not in SPLITS or not 0 < n < 1_000_000:
            raise ValueError(f"bad size for split {split!r}: {n}")
    heldout = holdout_cells(seed, holdout)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    pool = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers) \
        if workers > 1 else None
    counts = {}
    try:
        for split in SPLITS:
            combos = assign_combos(seed, split, sizes[split], heldout)
            _render_split(out, seed, split, combos, image_size, pool, progress)
            write_labels(out, split, combos)
            queries = make_queries(seed, split, combos, heldout, holdout_phrasings)
            counts[split] = {"images": len(combos),
                             **_write_queries(out, split, queries, bool(heldout) or holdout_phrasings)}
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    with atomic_write(out / "vocab.txt") as f:
        f.write("\n".join(vocab_tokens()) + "\n")
    for name, classes in (("colour", [c for c, _ in COLOURS]), ("shape", SHAPES)):
        with atomic_write(out / f"classes_{name}.txt") as f:
            f.write("\n".join(classes) + "\n")
    with atomic_write(out / "zeroshot_templates.txt") as f:
        f.write("\n".join(SYNTHETIC_ZEROSHOT_TEMPLATES) + "\n")
    meta = {"generator": "data.synthetic", "seed": seed, "image_size": image_size, "counts": counts,
            "colours": [c for c, _ in COLOURS], "shapes": SHAPES, "positions": POSITIONS,
            "templates": TEMPLATES, "image_id_base": IMAGE_ID_BASE, "query_id_base": QUERY_ID_BASE,
            "holdout": {"cells": [[COLOURS[c][0], SHAPES[s], POSITIONS[p]]
                                  for c, s, p in map(combo_parts, heldout)],
                        "phrasings": HELDOUT_TEMPLATES if holdout_phrasings else []}}
    with atomic_write(out / "meta.json") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    return meta


def _render_split(out: Path, seed: int, split: str, combos: np.ndarray, image_size: int, pool,
                  progress: bool) -> None:
    from tqdm import tqdm

    n, step = len(combos), 500
    jobs = [(seed, split, s, combos[s:s + step].tolist(), image_size) for s in range(0, n, step)]
    results = pool.imap(_render_chunk, jobs) if pool else map(_render_chunk, jobs)
    with atomic_write(out / f"{split}_imgs.tsv", "wb") as f, \
            tqdm(total=n, desc=f"synthetic {split}", unit="img", disable=not progress, file=sys.stderr) as bar:
        for lines in results:
            f.writelines(lines)
            bar.update(len(lines))


def _write_queries(out: Path, split: str, queries: List[Dict], by_category: bool) -> Dict:
    """{split}_queries.jsonl (MUGE's three fields) and, when asked, one file per non-empty category."""
    strip = lambda q: {k: q[k] for k in ("query_id", "query_text", "item_ids")}  # noqa: E731
    _write_jsonl(out / f"{split}_queries.jsonl", map(strip, queries))
    counts = {"queries": len(queries), "pairs": sum(len(q["item_ids"]) for q in queries)}
    if by_category and split != "train":
        for cat in QUERY_CATEGORIES:
            mine = [strip(q) for q in queries if q["category"] == cat]
            if mine:
                _write_jsonl(out / f"{split}_queries_{cat}.jsonl", mine)
            counts[f"queries_{cat}"] = len(mine)
    return counts
