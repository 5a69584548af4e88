"""The three inputs end to end through the command-line tools, on CPU: a Chinese-CLIP dataset
package, img2dataset webdataset shards (with a failed-download gap and a corrupt JPEG), and a
weighted mixture of the two built data sets. Each: build -> train 3 steps -> extract -> retrieve
-> evaluate."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.sampler import MixtureSampler
from engine.run.log import read_scalars
from tests.dist.workers.engine_common import write_ds
from tests.ranks import base_env
from tests.real_formats import WEBDATASET_PIP, chinese_clip_package, img2dataset_shards
from tests.unit.test_real_formats import _cn_score

pytest.importorskip("webdataset", reason=WEBDATASET_PIP)
REPO = Path(__file__).resolve().parents[2]
R, CONTEXT, MICRO = 32, 16, 8


def cli(script, *args, ok=True):
    p = subprocess.run([sys.executable, str(REPO / "launch" / script), *map(str, args)], cwd=REPO,
                       env=base_env(), capture_output=True, text=True, timeout=900)
    if ok:
        assert p.returncode == 0, f"{script}: {p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("pipeline")
    syn = root / "syn"
    make_synthetic(syn, seed=0, sizes={"train": 96, "valid": 30, "test": 4}, image_size=R, workers=1, progress=False)
    chinese_clip_package(syn, root / "cn")
    img2dataset_shards(syn, "train", root / "shards", per_shard=24, gaps=[5], corrupt=[30])
    img2dataset_shards(syn, "valid", root / "valid_shards", per_shard=16,
                       key_of=lambda shard, index, image_id: f"{image_id:09d}")
    vocab = syn / "vocab.txt"
    common = ["--vocab", vocab, "--resolution", R, "--context-length", CONTEXT, "--workers", "1", "--no-progress"]
    cli("build_dataset.py", "--queries", root / "cn" / "train_texts.jsonl", "--images", root / "cn" / "lmdb" / "train",
        "--output", root / "built_cn", *common)
    out = cli("build_dataset.py", "--images", root / "shards" / "{00000..00003}.tar", "--on-error", "skip",
              "--output", root / "built_wds", *common).stdout
    assert "skipped 1 sample(s) built now (undecodable image: 1)" in out
    cli("build_lmdb.py", "--input", root / "cn" / "lmdb" / "valid", "--output", root / "valid_cn", "--resolution", R,
        "--workers", "1", "--no-progress")
    cli("build_lmdb.py", "--input", root / "valid_shards" / "*.tar", "--output", root / "valid_wds", "--resolution",
        R, "--workers", "1", "--no-progress")
    return {"root": root, "syn": syn, "vocab": vocab, "ds": write_ds(root / "ds.json", stage=0, micro=MICRO)}


def train_extract_retrieve(data, name, train_data, val_data, val_img):
    root = data["root"]
    cli("train.py", "--deepspeed_config", data["ds"], *train_data, "--val-data", val_data, "--val-img", val_img,
        "--vocab", data["vocab"], "--model", "ViT-tiny-test", "--text-model", "BERT-tiny-test", "--context-length",
        CONTEXT, "--epochs", 1, "--max-steps", 3, "--lr", "1e-3", "--warmup", 1, "--log-every-steps", 1,
        "--save-frequency", 0, "--export", "--logs", root / "runs", "--name", name, "--dist-timeout", 120)
    feats = root / f"feats_{name}"
    cli("extract.py", "--run", root / "runs" / name, "--image-lmdb", val_img, "--queries", val_data, "--output", feats,
        "--no-progress")
    for direction in ("t2i", "i2t"):
        cli("retrieve.py", "--image-feats", feats / "image_feats", "--text-feats", feats / "text_feats", "--top-k", 10,
            "--direction", direction, "--output", feats / f"{direction}.jsonl", "--no-progress")
    cli("evaluate.py", "--mode", "both", "--pred", feats / "t2i.jsonl", "--pred-i2t", feats / "i2t.jsonl",
        "--ref", val_data, "--out", feats / "both.json")
    return feats, json.loads((feats / "both.json").read_text())


def _rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_chinese_clip_package_end_to_end(data):
    cn = data["root"] / "cn"
    feats, result = train_extract_retrieve(data, "cn", ["--train-data", data["root"] / "built_cn"],
                                           cn / "valid_texts.jsonl", data["root"] / "valid_cn")
    t2i, i2t = _rows(feats / "t2i.jsonl"), _rows(feats / "i2t.jsonl")
    assert set(t2i[0]) == {"text_id", "image_ids"} and set(i2t[0]) == {"image_id", "text_ids"}  # its schema
    texts = _rows(cn / "valid_texts.jsonl")
    truth = {t["text_id"]: t["image_ids"] for t in texts}
    want = _cn_score(truth, {r["text_id"]: r["image_ids"] for r in t2i})
    assert result["success"] and result["scoreJson"]["t2i"]["mean_recall"] == want["score"]
    tr = {}
    for t in texts:  # Chinese-CLIP's transform_ir_annotation_to_tr.py, restated
        for i in t["image_ids"]:
            tr.setdefault(i, []).append(t["text_id"])
    (feats / "valid_texts.tr.jsonl").write_text("".join(json.dumps({"image_id": i, "text_ids": v}) + "\n"
                                                       for i, v in tr.items()))
    cli("evaluate.py", "--mode", "i2t", "--pred", feats / "i2t.jsonl", "--ref", feats / "valid_texts.tr.jsonl",
        "--out", feats / "i2t_score.json")
    got = json.loads((feats / "i2t_score.json").read_text())["scoreJson"]["i2t"]["mean_recall"]
    assert got == result["scoreJson"]["i2t"]["mean_recall"] == _cn_score(tr, {r["image_id"]: r["text_ids"] for r in i2t})["score"]


def test_img2dataset_shards_end_to_end(data):
    feats, result = train_extract_retrieve(data, "wds", ["--train-data", data["root"] / "built_wds"],
                                           data["syn"] / "valid_queries.jsonl", data["root"] / "valid_wds")
    assert result["success"] and 0 <= result["scoreJson"]["mean_recall"] <= 100
    t2i = _rows(feats / "t2i.jsonl")
    queries = _rows(data["syn"] / "valid_queries.jsonl")
    assert [r["query_id"] for r in t2i] == [q["query_id"] for q in queries] and len(t2i[0]["item_ids"]) == 10


def test_weighted_mixture_end_to_end_logs_each_sources_share(data):
    root = data["root"]
    feats, result = train_extract_retrieve(
        data, "mix", ["--train-data", root / "built_cn", "--train-data", root / "built_wds", "--train-data-weights", "1,3"],
        data["syn"] / "valid_queries.jsonl", root / "valid_wds")
    assert result["success"]
    scalars = read_scalars(root / "runs" / "mix" / "tensorboard")
    sizes = [json.loads((root / d / "manifest.json").read_text())["pairs"] for d in ("built_cn", "built_wds")]
    sampler = MixtureSampler(sizes, [1, 3], 0, 1, seed=123)  # the run's seed (train.py's default), one rank
    for step in (1, 2, 3):  # the logged share is that of the step's samples, as the sampler deals them
        src = sampler.source_of(sampler.indices((step - 1) * MICRO, step * MICRO, epoch=0))
        want = np.bincount(src, minlength=2) / MICRO
        got = [dict(scalars[f"data/share/{k}_{n}"])[step] for k, n in enumerate(("built_cn", "built_wds"))]
        assert np.allclose(got, want), (step, got, want)
    log = (root / "runs" / "mix" / "train.log").read_text()
    assert "mixture: 0_built_cn (96 pairs, weight 1" in log and "weight 3" in log
