"""Both directions: recall against a straightforward independent implementation, image->text top-k
against a full sort of the transposed score matrix, and the CLI's modes and errors."""
import json

import numpy as np
import pytest

from engine.scoring.recall import invert_references
from engine.inference.feature_files import save_features
from launch.evaluate import main as evaluate_main
from launch.retrieve import main as retrieve_main
from tests.unit.test_retrieval import grid_features, oracle_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def random_task(seed, n_images=60, n_queries=40, k=10):
    """Queries with 1-4 correct images (so images often have several correct texts), some images
    listed by no query, and random top-k predictions in both directions that often hit."""
    rng = np.random.default_rng(seed)
    images = (5000 + rng.permutation(200)[:n_images]).tolist()
    listed = images[: n_images - 7]  # the last 7 images have no text
    queries = {100 + q: rng.choice(listed, int(rng.integers(1, 5)), replace=False).tolist()
               for q in range(n_queries)}
    t2i = {}
    for q, items in queries.items():
        pool = rng.permutation(images).tolist()
        if rng.random() < 0.6:  # put a correct image somewhere in the top k
            pool.remove(items[0])
            pool.insert(int(rng.integers(0, k)), items[0])
        t2i[q] = pool[:k]
    i2t = {}
    qids = list(queries)
    for img in images:
        pool = rng.permutation(qids).tolist()
        owners = [q for q in qids if img in queries[q]]
        if owners and rng.random() < 0.6:
            pool.remove(owners[-1])
            pool.insert(int(rng.integers(0, k)), owners[-1])
        i2t[img] = pool[:k]
    return queries, t2i, i2t


def naive_recall(pred, correct):
    """{r: percent of keys with a correct item among their first r}, by plain loops."""
    out = {}
    for r in (1, 5, 10):
        hits = 0
        for key, good in correct.items():
            hits += any(p in good for p in pred[key][:r])
        out[r] = 100.0 * hits / len(correct)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_directions_equal_a_naive_implementation(seed, tmp_path):
    queries, t2i, i2t = random_task(seed)
    ref, p1, p2, out = (tmp_path / n for n in ("ref.jsonl", "t2i.jsonl", "i2t.jsonl", "out.json"))
    write_jsonl(ref, [{"query_id": q, "query_text": f"q{q}", "item_ids": v} for q, v in queries.items()])
    write_jsonl(p1, [{"query_id": q, "item_ids": v} for q, v in t2i.items()])
    write_jsonl(p2, [{"image_id": i, "text_ids": v} for i, v in i2t.items()])
    assert evaluate_main(["--mode", "both", "--pred", str(p1), "--pred-i2t", str(p2), "--ref", str(ref),
                          "--out", str(out)]) == 0
    s = json.loads(out.read_text())["scoreJson"]

    want_t2i = naive_recall(t2i, {q: set(v) for q, v in queries.items()})
    # An image's correct texts: every query whose item_ids hold it; images with none are not scored.
    by_image = {}
    for img in i2t:
        owners = {q for q, v in queries.items() if img in v}
        if owners:
            by_image[img] = owners
    want_i2t = naive_recall(i2t, by_image)
    assert max(len(v) for v in by_image.values()) >= 3  # several correct texts per image happen
    for d, want in (("t2i", want_t2i), ("i2t", want_i2t)):
        for r in (1, 5, 10):
            assert s[d][f"r{r}"] == pytest.approx(want[r], abs=1e-9), (d, r)
        assert s[d]["mean_recall"] == pytest.approx(sum(want.values()) / 3, abs=1e-9)
    assert 0 < want_i2t[1] < want_i2t[10] < 100 and 0 < want_t2i[1] < 100  # not a degenerate case
    assert s["mean_recall"] == pytest.approx((sum(want_t2i.values()) + sum(want_i2t.values())) / 6, abs=1e-9)
    assert s["i2t"]["images"] == len(by_image) and s["i2t"]["ignored_images"] == len(i2t) - len(by_image) >= 7

    # mode i2t alone: the same numbers, the i2t file given as --pred
    assert evaluate_main(["--mode", "i2t", "--pred", str(p2), "--ref", str(ref), "--out", str(out)]) == 0
    one = json.loads(out.read_text())["scoreJson"]
    assert one["i2t"] == s["i2t"] and one["mean_recall"] == s["i2t"]["mean_recall"] and "t2i" not in one
    # mode t2i equals MUGE mode
    assert evaluate_main([str(p1), str(ref), str(tmp_path / "muge.json")]) == 0
    muge = json.loads((tmp_path / "muge.json").read_text())["scoreJson"]
    assert {k: s["t2i"][k] for k in ("r1", "r5", "r10", "mean_recall")} == \
        {k: muge[k] for k in ("r1", "r5", "r10", "mean_recall")}


def test_invert_references_lists_each_image_s_queries():
    assert invert_references({7: [1, 2], 3: [2, 2], 5: []}) == {1: [7], 2: [3, 7]}


def test_i2t_prediction_errors_name_the_line(tmp_path, capsys):
    ref = tmp_path / "ref.jsonl"
    write_jsonl(ref, [{"query_id": 1, "query_text": "a", "item_ids": [10, 11]},
                      {"query_id": 2, "query_text": "b", "item_ids": [11]},
                      {"query_id": 3, "query_text": "c", "item_ids": [12]}])
    cases = [
        ([{"image_id": 10, "text_ids": [1, 2]}, {"image_id": 11, "text_ids": [2, 1]}], "have no prediction: 12"),
        ([{"image_id": 10, "text_ids": [1, 2, 3]}], "pred.jsonl:1: image 10 has 3 predicted text ids, exactly 2"),
        ([{"image_id": 10, "text_ids": [1, 1]}], "pred.jsonl:1: image 10 has duplicate"),
        ([{"image_id": "10", "text_ids": [1, 2]}], "pred.jsonl:1: 'image_id' must be an integer"),
        ([{"image_id": 10, "text_ids": [1, 2]}, {"image_id": 10, "text_ids": [1, 2]}],
         "pred.jsonl:2: image 10 is predicted twice"),
        ([{"image_id": 10, "item_ids": [1, 2]}], "pred.jsonl:1: no predicted text ids"),
    ]
    pred, out = tmp_path / "pred.jsonl", tmp_path / "out.json"
    for lines, match in cases:
        write_jsonl(pred, lines)
        assert evaluate_main(["--mode", "i2t", "--pred", str(pred), "--ref", str(ref), "--out", str(out),
                              "--top-k", "2"]) == 2
        result = json.loads(out.read_text())
        assert result["success"] is False and match in result["errorMsg"], (match, result["errorMsg"])
        assert match in capsys.readouterr().err
    with pytest.raises(SystemExit):  # mode both without the i2t file: a usage error
        evaluate_main(["--mode", "both", "--pred", str(pred), "--ref", str(ref), "--out", str(out)])


@pytest.mark.parametrize("block", [None, 128])
def test_i2t_topk_equals_full_sort_of_transposed_scores(block, tmp_path):
    rng = np.random.default_rng(3)
    texts = grid_features(rng, 300, 16)  # few levels: many exact ties, decided by the text row
    texts[17] = texts[200]
    images = grid_features(rng, 45, 16)
    t_ids = 900 + rng.permutation(1000)[:300]
    i_ids = 10 + np.arange(45)
    save_features(tmp_path / "t.npz", t_ids, texts)
    save_features(tmp_path / "i.npz", i_ids, images)
    args = ["--image-feats", str(tmp_path / "i.npz"), "--text-feats", str(tmp_path / "t.npz"),
            "--direction", "i2t", "--top-k", "10", "--output", str(tmp_path / "p.jsonl"), "--no-progress"]
    if block:
        args += ["--image-block", str(block), "--query-chunk", "7"]
    assert retrieve_main(args) == 0
    got = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    # the transposed score matrix: texts x images; its columns, fully sorted, rank the texts
    scores_t = texts.astype(np.float64) @ images.astype(np.float64).T
    want = np.stack([np.lexsort((np.arange(300), -scores_t[:, j]))[:10] for j in range(45)])
    assert [g["image_id"] for g in got] == i_ids.tolist()
    assert [g["text_ids"] for g in got] == t_ids[want].tolist()
    assert np.array_equal(want, oracle_rows(images, texts, 10))  # the same rule as text->image
