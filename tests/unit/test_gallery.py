"""The gallery page: built through the real CLI from a real store, then checked two ways: by parsing
the HTML and decoding every embedded image (always), and by rendering it in headless Chromium when
the machine has one (skipped cleanly where it does not)."""
import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from data.images.store import ImageStoreWriter
from launch import gallery as gallery_cli

GREEN, RED = (0x22, 0xAA, 0x22), (0xCC, 0x33, 0x33)


class _Page(HTMLParser):
    """Collects queries, figures (class, image id, src) and the metric cells."""

    def __init__(self):
        super().__init__()
        self.queries, self.figures, self.metrics, self._cell, self._caption = [], [], {}, None, False
        self.title = ""
        self._in_h1 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("class") == "query":
            self.queries.append(int(a["data-query-id"]))
            self.figures.append([])
        elif tag == "figure":
            self.figures[-1].append({"cls": a["class"], "id": int(a["data-image-id"]), "caption": ""})
        elif tag == "img":
            self.figures[-1][-1]["src"] = a["src"]
        elif tag == "figcaption":
            self._caption = True
        elif tag == "td" and "id" in a:
            self._cell = a["id"]
        elif tag == "h1":
            self._in_h1 = True

    def handle_endtag(self, tag):
        self._caption = self._caption and tag != "figcaption"
        self._in_h1 = self._in_h1 and tag != "h1"

    def handle_data(self, data):
        if self._cell:
            self.metrics[self._cell] = float(data)
            self._cell = None
        if self._caption:
            self.figures[-1][-1]["caption"] += data
        if self._in_h1:
            self.title += data


def _page(tmp, *extra, queries="q.jsonl"):
    out = tmp / "g.html"
    assert gallery_cli.main(["--predictions", str(tmp / "pred.jsonl"), "--queries", str(tmp / queries),
                             "--images", str(tmp / "lmdb"), "--output", str(out), *extra]) == 0
    page = _Page()
    page.feed(out.read_text(encoding="utf-8"))
    return page


@pytest.fixture
def gallery_inputs(tmp_path):
    rng = np.random.default_rng(0)
    images = {100 + i: rng.integers(0, 256, (3, 32, 32), dtype=np.uint8) for i in range(12)}
    with ImageStoreWriter(tmp_path / "lmdb", resolution=32, source="test") as w:
        w.put_many(images.items())
        w.finish()
    # 3 queries: q1 correct at rank 1, q2 correct at rank 7, q3 never correct.
    refs = {1: [100], 2: [106, 111], 3: [999]}
    order = list(images)
    preds = {1: order[:10], 2: order[1:11], 3: order[2:12]}
    with open(tmp_path / "q.jsonl", "w", encoding="utf-8") as f:
        for q, items in refs.items():
            f.write(json.dumps({"query_id": q, "query_text": f"查询{q}", "item_ids": items}, ensure_ascii=False) + "\n")
    with open(tmp_path / "pred.jsonl", "w") as f:
        for q, items in preds.items():
            f.write(json.dumps({"query_id": q, "item_ids": items}) + "\n")
    return tmp_path, images, refs, preds


def test_gallery_html_marks_hits_and_embeds_the_stored_images(gallery_inputs):
    tmp, images, refs, preds = gallery_inputs
    out = tmp / "g.html"
    assert gallery_cli.main(["--predictions", str(tmp / "pred.jsonl"), "--queries", str(tmp / "q.jsonl"),
                             "--images", str(tmp / "lmdb"), "--output", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "查询2" in text and "http" not in text.replace("http-equiv", "")  # self-contained
    page = _Page()
    page.feed(text)
    assert page.queries == [1, 2, 3]
    # R@1: only q1; R@5: q1; R@10: q1, q2 (rank 7) -> 1/3, 1/3, 2/3.
    assert page.metrics["r1"] == pytest.approx(100 / 3, abs=0.01)
    assert page.metrics["r10"] == pytest.approx(200 / 3, abs=0.01)
    for qid, all_figs in zip(page.queries, page.figures):
        figs = [f for f in all_figs if f["cls"] != "missed"]
        assert [f["id"] for f in figs] == preds[qid]
        for f in figs:
            assert f["cls"] == ("hit" if f["id"] in refs[qid] else "miss")
            # A symbol as well as the colour: readable without telling red from green.
            assert f["caption"].startswith("\u2713 " if f["cls"] == "hit" else "\u2717 "), f["caption"]
            head, payload = f["src"].split(",", 1)
            assert head == "data:image/png;base64"
            decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))
            np.testing.assert_array_equal(decoded, images[f["id"]].transpose(1, 2, 0))


def test_gallery_shows_correct_images_that_were_not_retrieved(gallery_inputs):
    tmp, images, refs, preds = gallery_inputs
    page = _page(tmp)
    missed = {q: [(f["id"], "src" in f) for f in figs if f["cls"] == "missed"] for q, figs in zip(page.queries, page.figures)}
    # q1 found its only image; q2 found 106 but not 111; q3's image 999 is not even in the store.
    assert missed == {1: [], 2: [(111, True)], 3: [(999, False)]}


def test_failures_only_and_the_run_named_as_every_tool_names_it(gallery_inputs, capsys):
    from tests.dist.workers.extract_fixture import TEXT, VISION, build_tiny_split, save_tiny_model_file

    tmp, *_ = gallery_inputs
    run = tmp / "logs" / "my_run"
    code = gallery_cli.main(["--predictions", str(tmp / "pred.jsonl"), "--queries", str(tmp / "q.jsonl"),
                             "--images", str(tmp / "lmdb"), "--output", str(tmp / "g.html"), "--run", str(run)])
    assert code == 2 and "--run" in capsys.readouterr().err  # not a run of train.py --export: refused
    d = build_tiny_split(tmp / "model", n_images=2, n_queries=1)
    save_tiny_model_file(d, run / "model_fp32.pt")
    page = _page(tmp, "--failures-only", "--run", str(run))
    assert page.queries == [3]  # the only query with no correct image in its top 10
    # The run's name and what its model is, read from its record.
    assert f"run my_run ({VISION} + {TEXT} ({d['vocab_size']} tokens), context 24)" in page.title, page.title


def test_test_split_without_answers_renders_unmarked(gallery_inputs):
    tmp, images, refs, preds = gallery_inputs
    with open(tmp / "test_q.jsonl", "w", encoding="utf-8") as f:
        for q in refs:
            f.write(json.dumps({"query_id": q, "query_text": f"查询{q}"}, ensure_ascii=False) + "\n")
    page = _page(tmp, queries="test_q.jsonl")
    assert page.queries == [1, 2, 3] and not page.metrics
    assert all(f["cls"] == "unjudged" and f["caption"].startswith("#") for figs in page.figures for f in figs)
    assert [[f["id"] for f in figs] for figs in page.figures] == [preds[q] for q in (1, 2, 3)]


def test_gallery_rejects_predictions_outside_the_store(gallery_inputs, capsys):
    tmp, images, refs, preds = gallery_inputs
    bad = tmp / "bad.jsonl"
    bad.write_text("".join(json.dumps({"query_id": q, "item_ids": [5000 + i for i in range(10)]}) + "\n"
                           for q in refs))
    code = gallery_cli.main(["--predictions", str(bad), "--queries", str(tmp / "q.jsonl"),
                             "--images", str(tmp / "lmdb"), "--output", str(tmp / "g.html")])
    assert code == 2 and "5000" in capsys.readouterr().err
    assert not (tmp / "g.html").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_gallery_renders_in_headless_chromium(gallery_inputs):
    tmp, *_ = gallery_inputs
    out = tmp / "g.html"
    assert gallery_cli.main(["--predictions", str(tmp / "pred.jsonl"), "--queries", str(tmp / "q.jsonl"),
                             "--images", str(tmp / "lmdb"), "--output", str(out)]) == 0
    shot = tmp / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,900",
                    f"--screenshot={shot}", out.as_uri()], check=True, timeout=360, capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)

    def count(colour):
        return int((np.abs(pixels.astype(int) - colour).sum(axis=1) <= 6).sum())

    # The page drew both kinds of border: hits in green and misses in red.
    assert count(GREEN) > 100 and count(RED) > 100
