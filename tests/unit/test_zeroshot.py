"""Zero-shot accuracy of a tiny CLIP equals a classifier computed by hand in numpy."""
import json

import numpy as np
import pytest
import torch

from data.synthetic import COLOURS
from engine.tools.zeroshot import DEFAULT_TEMPLATES
from launch.zeroshot import main as zeroshot_main
from tests.dist.workers.extract_fixture import build_tiny_split, load_tiny_model

CLASSES = [c for c, _ in COLOURS]
USER_TEMPLATES = ["{}", "有一个{}", "左上角的{}圆形"]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    build_tiny_split(root)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    (root / "templates.txt").write_text("\n".join(USER_TEMPLATES) + "\n", encoding="utf-8")
    return root


def oracle(root, templates):
    """Independent of engine.tools.zeroshot: raw model outputs one prompt and one image at a time, then
    plain numpy for the normalisations, the mean, the scores and the ranking."""
    from data.images.transform import normalize_uint8
    from data.images.store import ImageStore
    from data.tokenizer import load_tokenizer, tokenize

    model = load_tiny_model(root).eval()
    tok = load_tokenizer(root / "vocab.txt")
    store = ImageStore(root / "lmdb")
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    with torch.no_grad():
        w = np.stack([unit(np.stack([unit(model.encode_text(tokenize(tok, t.format(c), 16), normalize=False)[0]
                                          .double().numpy()) for t in templates]).mean(0)) for c in CLASSES])
        ids = store.ids()
        img = np.stack([unit(model.encode_image(normalize_uint8(torch.from_numpy(store.get_many([i])), store.mean,
                                                                store.std), normalize=False)[0].double().numpy())
                        for i in ids])
    return ids, img @ w.T


def write_labels(root, ids, scores, seed=0):
    """Half the images labelled with their best class (so top-1 is not 0), half at random."""
    rng = np.random.default_rng(seed)
    labels = {i: int(np.argmax(s)) if n % 2 else int(rng.integers(len(CLASSES))) for n, (i, s) in
              enumerate(zip(ids, scores))}
    with open(root / "labels.jsonl", "w", encoding="utf-8") as f:
        for i, c in labels.items():
            f.write(json.dumps({"image_id": i, "label": CLASSES[c]}, ensure_ascii=False) + "\n")
    return labels


@pytest.mark.parametrize("user_templates", [False, True])
def test_accuracy_equals_a_hand_computed_classifier(split, tmp_path, user_templates):
    templates = USER_TEMPLATES if user_templates else DEFAULT_TEMPLATES
    ids, scores = oracle(split, templates)
    labels = write_labels(split, ids, scores, seed=int(user_templates))
    top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    y = np.array([labels[i] for i in ids])
    want1 = 100 * np.mean(top[:, 0] == y)
    want5 = 100 * np.mean([y[n] in top[n] for n in range(len(y))])
    assert 0 < want1 < 100 and want1 < want5  # neither end: the comparison can fail

    common = ["--model", "ViT-tiny-test", "--text-model", "BERT-tiny-test", "--weights", str(split / "weights.pt"),
              "--vocab", str(split / "vocab.txt"), "--classes", str(split / "classes.txt"), "--labels",
              str(split / "labels.jsonl"), "--context-length", "16", "--batch-size", "7", "--no-progress"]
    if user_templates:
        common += ["--templates", str(split / "templates.txt")]
    out = tmp_path / "zs.json"
    assert zeroshot_main(common + ["--image-lmdb", str(split / "lmdb"), "--output", str(out)]) == 0
    r = json.loads(out.read_text(encoding="utf-8"))
    assert r["top1"] == pytest.approx(want1, abs=1e-9) and r["top5"] == pytest.approx(want5, abs=1e-9)
    assert r["templates"] == templates and r["images"] == len(ids)
    for c, name in enumerate(CLASSES):
        mine = y == c
        got = r["per_class"][name]
        assert got["images"] == int(mine.sum())
        if mine.any():
            assert got["top1"] == pytest.approx(100 * np.mean(top[mine, 0] == c), abs=1e-9)
        else:
            assert got["top1"] is None

    # from extracted features instead of the store: the same result
    from launch.extract import main as extract_main
    assert extract_main(["--model", "ViT-tiny-test", "--text-model", "BERT-tiny-test", "--weights",
                         str(split / "weights.pt"), "--vocab", str(split / "vocab.txt"), "--image-lmdb",
                         str(split / "lmdb"), "--queries", str(split / "queries.jsonl"), "--output",
                         str(tmp_path / "f"), "--no-progress"]) == 0
    out2 = tmp_path / "zs2.json"
    assert zeroshot_main(common + ["--image-feats", str(tmp_path / "f" / "image_feats"), "--output", str(out2)]) == 0
    assert json.loads(out2.read_text(encoding="utf-8")) == r


@pytest.mark.parametrize("bad, match", [
    ("labels", "labels.jsonl:2: label '黑色' of image"),
    ("templates", "templates.txt:1: a template needs exactly one {}"),
    ("classes", "classes.txt:3: class '红色' repeats line 1"),
])
def test_bad_input_names_the_file_and_line(split, tmp_path, capsys, bad, match):
    files = {"labels": tmp_path / "labels.jsonl", "templates": tmp_path / "templates.txt",
             "classes": tmp_path / "classes.txt"}
    files["labels"].write_text('{"image_id": 1, "label": "红色"}\n{"image_id": 2, "label": "黑色"}\n'
                               if bad == "labels" else '{"image_id": 1, "label": "红色"}\n', encoding="utf-8")
    files["templates"].write_text("一张图片\n" if bad == "templates" else "{}\n", encoding="utf-8")
    files["classes"].write_text("红色\n蓝色\n红色\n" if bad == "classes" else "红色\n蓝色\n", encoding="utf-8")
    code = zeroshot_main(["--model", "ViT-tiny-test", "--text-model", "BERT-tiny-test", "--weights",
                          str(split / "weights.pt"), "--vocab", str(split / "vocab.txt"), "--classes",
                          str(files["classes"]), "--labels", str(files["labels"]), "--templates",
                          str(files["templates"]), "--image-lmdb", str(split / "lmdb"),
                          "--output", str(tmp_path / "o.json")])
    assert code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
