"""The synthetic MUGE-format data: formats, determinism, captions that match the pixels, no [UNK]."""
import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data.images.store import ImageStore
from data.queries import read_queries, training_pairs, check_ids_present
from data.synthetic import COLOURS, POSITIONS, SHAPES, make_synthetic
from data.tokenizer import load_tokenizer, tokenize

SIZES = {"train": 120, "valid": 60, "test": 50}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    make_synthetic(out, seed=3, sizes=SIZES, workers=1, progress=False)
    return out


def _read_tsv(path):
    out = {}
    for line in path.read_bytes().splitlines():
        image_id, b64 = line.split(b"\t")
        assert b"+" not in b64 and b"/" not in b64  # MUGE's URL-safe alphabet
        out[int(image_id)] = Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))
    return out


def _parse_caption(text):
    """Which colour, shape and position a caption names (by the words, not by the generator)."""
    found = lambda words: [w for w in words if w in text]  # noqa: E731
    colour, pos = found([c for c, _ in COLOURS]), found(POSITIONS)
    shape = [s for s in found(SHAPES) if not any(s != t and s in t for t in found(SHAPES))]
    assert len(colour) == len(shape) == len(pos) == 1, text
    return colour[0], shape[0], pos[0]


def test_files_and_formats(synth):
    names = sorted(p.name for p in synth.iterdir())
    assert names == sorted([f"{s}_{k}" for s in SIZES for k in ("imgs.tsv", "queries.jsonl", "labels_colour.jsonl",
                                                                 "labels_shape.jsonl")]
                           + ["vocab.txt", "meta.json", "classes_colour.txt", "classes_shape.txt",
                              "zeroshot_templates.txt"])
    all_ids = set()
    for split, n in SIZES.items():
        imgs = _read_tsv(synth / f"{split}_imgs.tsv")
        assert len(imgs) == n and not (set(imgs) & all_ids)  # ids unique across splits
        all_ids |= set(imgs)
        assert all(im.format == "JPEG" and im.size == (64, 64) for im in imgs.values())
        for line in (synth / f"{split}_queries.jsonl").read_text(encoding="utf-8").splitlines():
            assert set(json.loads(line)) == {"query_id", "query_text", "item_ids"}
        qs = read_queries(synth / f"{split}_queries.jsonl")
        assert {i for q in qs for i in q.item_ids} == set(imgs)
        if split == "train":
            assert len(qs) == n and len(training_pairs(qs)) == n
        else:
            # One query per distinct description, answered by every image that fits it.
            texts = [_parse_caption(q.text) for q in qs]
            assert len(set(texts)) == len(qs)
            assert max(len(q.item_ids) for q in qs) >= 2


def _cell_centre_colour(img, pos):
    row, col = divmod(POSITIONS.index(pos), 3)
    a = np.asarray(img.convert("RGB"), dtype=np.float64)
    c = 64 / 3
    y, x = int((row + 0.5) * c), int((col + 0.5) * c)
    return a[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0), a


def test_captions_match_the_pixels(synth):
    """Oracle from the image alone: the named colour sits at the named cell's centre (for all shapes
    except the hollow ring, whose centre shows the background), and nowhere else is bright."""
    palette = dict(COLOURS)
    for split in SIZES:
        imgs = _read_tsv(synth / f"{split}_imgs.tsv")
        for q in read_queries(synth / f"{split}_queries.jsonl"):
            colour, shape, pos = _parse_caption(q.text)
            for image_id in q.item_ids:
                centre, a = _cell_centre_colour(imgs[image_id], pos)
                dist = np.abs(centre - np.array(palette[colour])).max()
                nearest = min(palette, key=lambda k: np.abs(centre - np.array(palette[k])).max())
                if shape == "圆环":
                    assert centre.max() < 90, (q.text, centre)  # a hole of dark background
                else:
                    assert nearest == colour and dist < 45, (q.text, centre)
                row, col = divmod(POSITIONS.index(pos), 3)
                mask = np.ones((64, 64), bool)
                mask[max(0, int((row - 0.3) * 64 / 3)):int((row + 1.3) * 64 / 3),
                     max(0, int((col - 0.3) * 64 / 3)):int((col + 1.3) * 64 / 3)] = False
                assert a[mask].max() < 110, q.text  # only background outside the named cell


def test_vocab_covers_every_caption(synth):
    tok = load_tokenizer(synth)
    vocab = (synth / "vocab.txt").read_text(encoding="utf-8").split()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    texts = [q.text for s in SIZES for q in read_queries(synth / f"{s}_queries.jsonl")]
    ids = tokenize(tok, texts, context_length=52)
    assert (ids == tok.unk_token_id).sum() == 0
    lengths = (ids != 0).sum(1)
    assert lengths.tolist() == [len(t) + 2 for t in texts]  # one token per character


def test_deterministic_by_seed_whatever_the_workers(synth, tmp_path):
    make_synthetic(tmp_path / "again", seed=3, sizes=SIZES, workers=2, progress=False)
    make_synthetic(tmp_path / "other", seed=4, sizes=SIZES, workers=1, progress=False)
    for name in ("train_imgs.tsv", "valid_queries.jsonl", "test_imgs.tsv", "vocab.txt"):
        assert (tmp_path / "again" / name).read_bytes() == (synth / name).read_bytes()
    assert (tmp_path / "other" / "train_imgs.tsv").read_bytes() != (synth / "train_imgs.tsv").read_bytes()


def test_cli_and_store(tmp_path, repo_root):
    p = subprocess.run([sys.executable, str(repo_root / "launch" / "make_synthetic.py"), "--out", str(tmp_path),
                        "--train-images", "30", "--valid-images", "20", "--test-images", "10", "--workers", "1",
                        "--build-lmdb", "--no-progress"], capture_output=True, text=True, timeout=360)
    assert p.returncode == 0, p.stderr
    store = ImageStore(tmp_path / "lmdb" / "valid")
    assert len(store) == 20 and store.resolution == 64
    check_ids_present(read_queries(tmp_path / "valid_queries.jsonl"), store)
    # 64 px images stored at 64: the store holds exactly the decoded JPEG pixels.
    imgs = _read_tsv(tmp_path / "valid_imgs.tsv")
    i = store.ids()[0]
    assert store.get(i).tobytes() == np.asarray(imgs[i].convert("RGB")).transpose(2, 0, 1).tobytes()
