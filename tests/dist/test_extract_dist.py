"""Extraction with the real tiny CLIP and a real LMDB: 2 gloo ranks write the same features as
1 process (bit for bit), features match a direct encode, and the CLI chain extract -> retrieve ->
evaluate scores what evaluate_retrieval (the trainer's validation) computes on 1 and 2 ranks."""
import json

import numpy as np
import pytest
import torch

from engine.inference.feature_files import load_features
from launch.evaluate import main as evaluate_main
from launch.extract import main as extract_main
from launch.retrieve import main as retrieve_main
from tests.dist.workers.extract_fixture import build_tiny_split, load_tiny_model
from tests.ranks import assert_all_ok, run_ranks


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_split")
    build_tiny_split(root)
    return root


def extract_args(root, out):
    return ["--model", "ViT-tiny-test", "--text-model", "BERT-tiny-test", "--weights", str(root / "weights.pt"),
            "--vocab", str(root / "vocab.txt"), "--image-lmdb", str(root / "lmdb"), "--queries",
            str(root / "queries.jsonl"), "--output", str(out), "--batch-size", "4", "--context-length", "16",
            "--jsonl", "--no-progress"]


def direct_features(root):
    """Everything in one batch, straight through the model: an independent reference."""
    from data.images.transform import normalize_uint8
    from data.images.store import ImageStore
    from data.queries import read_queries
    from data.tokenizer import load_tokenizer, tokenize

    model = load_tiny_model(root).eval()
    store = ImageStore(root / "lmdb")
    ids = store.ids()
    queries = read_queries(root / "queries.jsonl")
    with torch.no_grad():
        img = model.encode_image(normalize_uint8(torch.from_numpy(store.get_many(ids)), store.mean, store.std))
        txt = model.encode_text(tokenize(load_tokenizer(root / "vocab.txt"), [q.text for q in queries], 16))
    return np.asarray(ids), img.numpy(), np.asarray([q.query_id for q in queries]), txt.numpy()


def test_two_ranks_equal_one_and_direct_encoding(split, tmp_path, repo_root):
    results = run_ranks([str(repo_root / "launch/extract.py"), *extract_args(split, tmp_path / "two")],
                        world_size=2, timeout=540)
    assert_all_ok(results)
    assert sorted(p.name for p in (tmp_path / "two/image_feats").iterdir()) == \
        ["part-00000-of-00002.npz", "part-00001-of-00002.npz"]
    assert extract_main(extract_args(split, tmp_path / "one")) == 0

    img_ids, img, q_ids, txt = direct_features(split)
    for name, ids_ref, feats_ref in (("image_feats", img_ids, img), ("text_feats", q_ids, txt)):
        ids2, f2 = load_features(tmp_path / "two" / name)
        ids1, f1 = load_features(tmp_path / "one" / name)
        np.testing.assert_array_equal(ids2, ids1)
        np.testing.assert_array_equal(f2, f1)  # bit-identical: same batches whatever the world size
        np.testing.assert_array_equal(ids1, ids_ref)
        np.testing.assert_allclose(f1, feats_ref, atol=2e-6, rtol=0)
        assert f1.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(f1, axis=1), 1, atol=1e-6)
        # the seed's jsonl holds the same numbers
        ids_j, f_j = load_features(tmp_path / "one" / f"{name}.jsonl")
        np.testing.assert_array_equal(ids_j, ids1)
        np.testing.assert_array_equal(f_j, f1)
    first = json.loads((tmp_path / "one/text_feats.jsonl").read_text().splitlines()[0])
    assert set(first) == {"query_id", "feature"}


def test_cli_chain_equals_evaluate_retrieval_on_1_and_2_ranks(split, tmp_path, repo_root):
    from data.images.store import ImageStore
    from data.queries import read_queries
    from data.tokenizer import load_tokenizer
    from engine.train.validation import evaluate_retrieval

    out = tmp_path / "feats"
    assert extract_main(extract_args(split, out)) == 0
    assert retrieve_main(["--image-feats", str(out / "image_feats"), "--text-feats", str(out / "text_feats"),
                          "--output", str(tmp_path / "pred.jsonl"), "--no-progress"]) == 0
    assert evaluate_main([str(tmp_path / "pred.jsonl"), str(split / "queries.jsonl"), str(tmp_path / "s.json")]) == 0
    # each folder records what it holds; handed swapped, retrieve refuses instead of writing predictions
    from engine.inference.feature_files import open_features
    meta = open_features(out / "image_feats").meta
    assert meta["kind"] == "image" and meta["count"] == len(ImageStore(split / "lmdb"))
    assert (meta["image_model"], meta["text_model"], meta["weights"]) == \
        ("ViT-tiny-test", "BERT-tiny-test", str((split / "weights.pt").resolve()))
    assert open_features(out / "text_feats").meta["kind"] == "text"
    assert retrieve_main(["--image-feats", str(out / "text_feats"), "--text-feats", str(out / "image_feats"),
                          "--output", str(tmp_path / "swapped.jsonl"), "--no-progress"]) == 2
    assert not (tmp_path / "swapped.jsonl").exists()
    cli = json.loads((tmp_path / "s.json").read_text())["scoreJson"]

    model = load_tiny_model(split)
    model.train()
    one = evaluate_retrieval(model, ImageStore(split / "lmdb"), read_queries(split / "queries.jsonl"),
                             load_tokenizer(split / "vocab.txt"), 16, 4, torch.device("cpu"))
    assert model.training  # restored
    assert set(one) == {"r1", "r5", "r10", "mean_recall"}
    for key in one:
        assert one[key] == pytest.approx(cli[key], abs=1e-9)
    assert 0 < one["r10"] and one["r1"] < 100  # a random model: neither degenerate end

    results = run_ranks([str(repo_root / "tests/dist/workers/extract_eval.py"), str(split), str(tmp_path)],
                        world_size=2, timeout=540)
    assert_all_ok(results)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["training"] is True
        assert r["scores"] == one  # identical on every rank, and equal to one process


def test_validation_both_directions_equals_the_cli_chain(split, tmp_path):
    """The trainer's both-direction validation scores what retrieve.py (t2i and i2t) + evaluate.py
    --mode both compute from extracted files; its t2i numbers are evaluate_retrieval's."""
    from data.images.store import ImageStore
    from data.queries import read_queries
    from data.tokenizer import load_tokenizer
    from engine.train.validation import evaluate_both_directions, evaluate_retrieval

    out = tmp_path / "feats"
    assert extract_main(extract_args(split, out)) == 0
    for d in ("t2i", "i2t"):
        assert retrieve_main(["--image-feats", str(out / "image_feats"), "--text-feats", str(out / "text_feats"),
                              "--direction", d, "--output", str(tmp_path / f"{d}.jsonl"), "--no-progress"]) == 0
    assert evaluate_main(["--mode", "both", "--pred", str(tmp_path / "t2i.jsonl"), "--pred-i2t",
                          str(tmp_path / "i2t.jsonl"), "--ref", str(split / "queries.jsonl"),
                          "--out", str(tmp_path / "s.json")]) == 0
    cli = json.loads((tmp_path / "s.json").read_text())["scoreJson"]

    model = load_tiny_model(split)
    args = (model, ImageStore(split / "lmdb"), read_queries(split / "queries.jsonl"),
            load_tokenizer(split / "vocab.txt"), 16, 4, torch.device("cpu"))
    both = evaluate_both_directions(*args)
    t2i_only = evaluate_retrieval(*args)
    for key in ("r1", "r5", "r10", "mean_recall"):
        assert both[key] == both[f"t2i_{key}"] == t2i_only[key]
        assert both[f"t2i_{key}"] == pytest.approx(cli["t2i"][key], abs=1e-9)
        assert both[f"i2t_{key}"] == pytest.approx(cli["i2t"][key], abs=1e-9)
    assert both["mean_recall_both"] == pytest.approx(cli["mean_recall"], abs=1e-9)
    assert 0 < both["i2t_r10"] and both["i2t_r1"] < 100
