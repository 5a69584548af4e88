"""Held-out compositions: held-out cells and phrasings never reach training (captions, or images as
their pixels show), valid/test ask them beside near-miss distractors, and the label files agree
with the pixels."""
import json
import re

import numpy as np
import pytest

from data.queries import read_queries
from data.synthetic import COLOURS, HELDOUT_TEMPLATES, POSITIONS, SHAPES, TEMPLATES, make_synthetic
from tests.unit.test_data_synthetic import _parse_caption, _read_tsv

SIZES = {"train": 700, "valid": 600, "test": 60}


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    out = tmp_path_factory.mktemp("held")
    meta = make_synthetic(out, seed=5, sizes=SIZES, workers=1, progress=False, holdout=40,
                          holdout_phrasings=True)
    return out, meta


def _template_of(text):
    """Which phrasing a caption uses, by matching it against every template's pattern."""
    words = lambda xs: "(" + "|".join(sorted(xs, key=len, reverse=True)) + ")"  # noqa: E731
    found = []
    for name, t in [(("seen", i), t) for i, t in enumerate(TEMPLATES)] + \
                   [(("held", i), t) for i, t in enumerate(HELDOUT_TEMPLATES)]:
        pattern = "^" + t.format(p=words(POSITIONS), c=words([c for c, _ in COLOURS]), s=words(SHAPES)) + "$"
        if re.match(pattern, text):
            found.append(name)
    assert len(found) == 1, (text, found)
    return found[0]


def _bright_colour_and_cell(img):
    """From the pixels alone: the shape's colour (median of the bright pixels, nearest palette
    entry) and the grid cell of their centroid."""
    a = np.asarray(img.convert("RGB"), dtype=np.float64)
    mask = a.max(2) > 110
    ys, xs = np.nonzero(mask)
    cell = int(ys.mean() // (64 / 3)) * 3 + int(xs.mean() // (64 / 3))
    median = np.median(a[mask], axis=0)
    colour = min(COLOURS, key=lambda c: np.abs(median - np.array(c[1])).sum())[0]
    return colour, POSITIONS[cell]


def test_heldout_cells_and_phrasings_never_in_training(held):
    out, meta = held
    cells = {tuple(c) for c in meta["holdout"]["cells"]}
    assert len(cells) == 40 and meta["holdout"]["phrasings"] == HELDOUT_TEMPLATES
    train = read_queries(out / "train_queries.jsonl")
    imgs = _read_tsv(out / "train_imgs.tsv")
    assert sorted(i for q in train for i in q.item_ids) == sorted(imgs)  # every train image has its caption
    labels = {json.loads(line)["image_id"]: json.loads(line)["label"]
              for line in (out / "train_labels_colour.jsonl").read_text(encoding="utf-8").splitlines()}
    for q in train:
        cell = _parse_caption(q.text)
        assert cell not in cells, q.text
        assert _template_of(q.text)[0] == "seen", q.text
        # the image shows what its caption says (colour and place from the pixels; the shape is
        # not read back from pixels here)
        assert _bright_colour_and_cell(imgs[q.item_ids[0]]) == (cell[0], cell[2]), q.text
        assert labels[q.item_ids[0]] == cell[0]
    # every colour-shape, colour-position and shape-position pair is still seen in training
    seen = {_parse_caption(q.text) for q in train}
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert {(c[i], c[j]) for c in cells} <= {(c[i], c[j]) for c in seen}


def test_valid_asks_heldout_cells_beside_near_misses(held):
    out, _ = held
    cats = {c: read_queries(out / f"valid_queries_{c}.jsonl") for c in ("seen", "heldout_cells", "heldout_phrasings")}
    allq = read_queries(out / "valid_queries.jsonl")
    assert sorted(q.query_id for c in cats.values() for q in c) == sorted(q.query_id for q in allq)
    present = {_parse_caption(q.text) for q in allq}
    assert len(cats["heldout_cells"]) == 40
    for q in cats["heldout_cells"]:
        c, s, p = _parse_caption(q.text)
        near = [x for x in present if sum(a != b for a, b in zip(x, (c, s, p))) == 1]
        assert len(near) >= 3, q.text  # distractors one attribute away are in the pool
    for q in cats["heldout_phrasings"]:
        assert _template_of(q.text)[0] == "held"
    for q in cats["seen"] + cats["heldout_cells"]:
        assert _template_of(q.text)[0] == "seen"
    phr = {_parse_caption(q.text): q.item_ids for q in cats["heldout_phrasings"]}
    assert phr == {_parse_caption(q.text): q.item_ids for q in cats["seen"]}  # same cells, new words


def test_without_holdout_the_data_is_unchanged(tmp_path):
    """Holding nothing out writes the same bytes as before the option existed (seed-determined)."""
    a = make_synthetic(tmp_path / "a", seed=5, sizes={"train": 50, "valid": 30, "test": 20}, workers=1,
                       progress=False)
    assert a["holdout"] == {"cells": [], "phrasings": []}
    assert not list((tmp_path / "a").glob("*_queries_*.jsonl"))
