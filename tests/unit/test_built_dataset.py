"""launch/build_dataset.py + data.built.reader: a built data set against the jsonl + single-LMDB path it replaces."""
import json
import os
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from data.images.build_store import build_store
from data.built.reader import BuiltDataset
from data.built.layout import shard_of
from data.images.datasets import PairDataset
from data.images.store import ImageStore
from data.queries import read_queries, training_pairs
from data.synthetic import make_synthetic
from data.tokenizer import load_tokenizer
from launch import build_dataset as cli
from tests.ranks import REPO, base_env

R = 32


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Synthetic MUGE files, an LMDB of the train images, and a queries file whose queries have one to
    three images and share images and texts (as MUGE's do)."""
    root = tmp_path_factory.mktemp("built_src")
    make_synthetic(root, seed=3, sizes={"train": 90, "valid": 4, "test": 4}, image_size=R, workers=1,
                   progress=False)
    build_store(root / "train_imgs.tsv", root / "lmdb", R, workers=1, progress=False)
    lines = [json.loads(x) for x in (root / "train_queries.jsonl").read_text(encoding="utf-8").splitlines()]
    ids = [q["item_ids"][0] for q in lines]
    for n in range(30):  # extra queries: repeated texts, several images each, images used again
        lines.append({"query_id": 90_000_000 + n, "query_text": lines[n % 7]["query_text"],
                      "item_ids": [ids[(5 * n) % 90], ids[(5 * n + 1) % 90], ids[(7 * n) % 90]][: 1 + n % 3]})
    (root / "q.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in lines), encoding="utf-8")
    return root


def build(src, out, *extra, queries="q.jsonl", images="train_imgs.tsv"):
    argv = ["--queries", str(src / queries), "--images", str(src / images), "--output", str(out),
            "--vocab", str(src / "vocab.txt"), "--resolution", str(R), "--context-length", "16",
            "--workers", "1", "--no-progress", *extra]
    return cli.main(argv)


def store_contents(path):
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = {bytes(k): bytes(v) for k, v in txn.cursor()}
    env.close()
    return out


def shard_contents(root, s):
    d = Path(root) / "shards" / f"{s:05d}"
    arrays = {n: np.load(d / f"{n}.npy") for n in ("image_ids", "pair_image", "pair_text", "tokens")}
    return arrays, store_contents(d / "images"), json.loads((d / "shard.json").read_text())


def oracle_in_shard_order(src, num_shards):
    """The seed's path (read_queries -> training_pairs -> PairDataset on the single LMDB), with its
    pairs put in the built set's order: by shard of the image, then file order."""
    pairs = training_pairs(read_queries(src / "q.jsonl"))
    ds = PairDataset(pairs, ImageStore(src / "lmdb"), load_tokenizer(src / "vocab.txt"), 16)
    shard = shard_of(np.array([i for _, i in pairs]), num_shards)
    order = np.concatenate([np.nonzero(shard == s)[0] for s in range(num_shards)])
    return ds, order


@pytest.mark.parametrize("images", ["train_imgs.tsv", "lmdb"])
def test_built_yields_the_pairs_and_image_bytes_of_the_jsonl_lmdb_path(src, tmp_path, images):
    assert build(src, tmp_path / "b", "--num-shards", "3", images=images) == 0
    built = BuiltDataset(tmp_path / "b")
    oracle, order = oracle_in_shard_order(src, 3)
    assert len(built) == len(oracle) == 90 + sum(1 + n % 3 for n in range(30))
    assert sum(built.shard_pair_counts) == len(built) and len(built.shard_pair_counts) == 3
    assert min(built.shard_pair_counts) > 0
    got = built.__getitems__(list(range(len(built))))
    want = oracle.__getitems__(order.tolist())
    for k, (g, w) in enumerate(zip(got, want)):
        assert g["image"].dtype == torch.uint8 and g["input_ids"].dtype == torch.long
        assert torch.equal(g["image"], w["image"]), k
        assert torch.equal(g["input_ids"], w["input_ids"]), k
    one = built[len(built) - 1]  # single items and shuffled batches read the same pairs
    assert torch.equal(one["image"], want[-1]["image"])
    perm = np.random.default_rng(0).permutation(len(built))[:17].tolist()
    for k, g in zip(perm, built.__getitems__(perm)):
        assert torch.equal(g["image"], want[k]["image"]) and torch.equal(g["input_ids"], want[k]["input_ids"])
    assert (built.resolution, built.mean, built.std) == (R, oracle.store.mean, oracle.store.std)
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    # both builders squash by default (Chinese-CLIP's preprocessing); the same pixels prove the same mode
    assert m["complete"] is True and m["preprocessing"]["resize"] == built.resize == oracle.store.resize == "squash"
    assert [s["pairs"] for s in m["shards"]] == built.shard_pair_counts and m["token_dtype"] == "uint16"


def test_shard_jobs_combined_equal_a_one_process_build(src, tmp_path, capsys):
    assert build(src, tmp_path / "one", "--num-shards", "2", "--workers", "2") == 0
    for i in (1, 0):
        assert build(src, tmp_path / "jobs", "--num-shards", "2", "--shard-index", str(i)) == 0
    assert not (tmp_path / "jobs" / "manifest.json").exists()  # not finalized yet: refused by readers
    with pytest.raises(ValueError, match="not finished"):
        BuiltDataset(tmp_path / "jobs")
    assert build(src, tmp_path / "jobs", "--num-shards", "2", "--finalize") == 0
    for s in range(2):
        (a1, imgs1, info1), (a2, imgs2, info2) = shard_contents(tmp_path / "one", s), shard_contents(tmp_path / "jobs", s)
        assert info1 == info2 and imgs1 == imgs2
        for n in a1:
            assert a1[n].dtype == a2[n].dtype and np.array_equal(a1[n], a2[n]), n
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "jobs"))
    assert m1 == m2


def test_killed_shard_build_resumes_to_an_identical_shard(src, tmp_path):
    assert build(src, tmp_path / "whole", "--num-shards", "1", "--shard-index", "0") == 0  # 90 images
    argv = [sys.executable, str(REPO / "launch" / "build_dataset.py"), "--queries", str(src / "q.jsonl"),
            "--images", str(src / "train_imgs.tsv"), "--output", str(tmp_path / "killed"), "--vocab",
            str(src / "vocab.txt"), "--resolution", str(R), "--context-length", "16", "--workers", "1",
            "--no-progress", "--num-shards", "1", "--shard-index", "0"]  # dies after a 64-image chunk
    p = subprocess.run(argv, env=base_env({"CLIP_TEST_KILL_AFTER_IMAGES": "20"}), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -9, p.stdout + p.stderr
    part = tmp_path / "killed" / "shards" / "00000"
    assert not (part / "shard.json").exists()
    n_before = len([k for k in store_contents(part / "images") if not k.startswith(b"__")])
    whole = shard_contents(tmp_path / "whole", 0)
    assert 20 <= n_before < len(whole[0]["image_ids"])
    p = subprocess.run(argv, env=base_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    resumed = shard_contents(tmp_path / "killed", 0)
    assert resumed[1] == whole[1] and resumed[2] == whole[2]
    for n in whole[0]:
        assert np.array_equal(resumed[0][n], whole[0][n]), n


def test_missing_image_fails_naming_the_query_or_is_counted_with_skip(src, tmp_path, capsys):
    text = (src / "q.jsonl").read_text(encoding="utf-8")
    bad = src / "q_missing.jsonl"
    bad.write_text(text + json.dumps({"query_id": 77, "query_text": "红色圆形", "item_ids": [5, 6]}) + "\n" +
                   json.dumps({"query_id": 78, "query_text": "红色圆形", "item_ids": [5]}) + "\n", encoding="utf-8")
    n_lines = len(text.splitlines())
    assert build(src, tmp_path / "f", queries="q_missing.jsonl") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"q_missing.jsonl:{n_lines + 1}: query 77: image id" in err

    assert build(src, tmp_path / "s", "--on-error", "skip", "--num-shards", "2", queries="q_missing.jsonl") == 0
    out = capsys.readouterr().out
    assert "skipped 3 pair(s)" in out
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["skipped_pairs"] == 3 and m["pairs"] == len(BuiltDataset(tmp_path / "s")) == 90 + 60
    listed = "".join(p.read_text() for p in (tmp_path / "s" / "shards").glob("*/skipped.tsv"))
    assert {line.split("\t")[0] for line in listed.splitlines()[1:] if not line.startswith("image_id")} == {"5", "6"}


def test_jpeg_round_trips_within_jpeg_error(src, tmp_path):
    assert build(src, tmp_path / "u8", "--num-shards", "2") == 0
    assert build(src, tmp_path / "jpg", "--num-shards", "2", "--format", "jpeg", "--jpeg-quality", "95") == 0
    u8, jpg = BuiltDataset(tmp_path / "u8"), BuiltDataset(tmp_path / "jpg")
    assert jpg.image_format == "jpeg" and len(u8) == len(jpg)
    idx = list(range(len(u8)))
    a = torch.stack([x["image"] for x in u8.__getitems__(idx)]).float()
    b = torch.stack([x["image"] for x in jpg.__getitems__(idx)]).float()
    assert b.shape == a.shape
    mse = ((a - b) ** 2).mean().item()
    psnr = 10 * np.log10(255.0 ** 2 / max(mse, 1e-9))
    assert psnr > 30, psnr  # q95 JPEG of smooth synthetic shapes
    assert (a - b).abs().mean().item() < 4
    assert not torch.equal(a, b)  # it really went through JPEG
    # The threaded decoder against torchvision's (another libjpeg binding): same pixels up to IDCT rounding.
    from torchvision.io import ImageReadMode, decode_jpeg

    sh = jpg._shard(0)
    ids = sh.image_ids[:20].tolist()
    blobs = sh.store.get_encoded(ids)
    ref = torch.stack([decode_jpeg(torch.frombuffer(bytearray(x), dtype=torch.uint8), mode=ImageReadMode.RGB)
                       for x in blobs])
    ours = torch.from_numpy(sh.store.get_many(ids))
    assert (ours.int() - ref.int()).abs().max().item() <= 2
    sizes = [len(x) for x in blobs]
    assert max(sizes) < 3 * R * R  # smaller than the uint8 tensor


def _train_argv(src, data, ctx, vocab):
    ds = src / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0}))
    return ["--deepspeed_config", str(ds), "--train-data", str(data), "--vocab", str(vocab),
            "--context-length", str(ctx), "--model", "ViT-tiny-test", "--text-model", "BERT-tiny-test"]


def test_train_refuses_another_vocab_or_context_length(src, tmp_path, capsys):
    from launch import train

    assert build(src, tmp_path / "b", "--num-shards", "1") == 0
    other = tmp_path / "vocab.txt"
    other.write_text((src / "vocab.txt").read_text(encoding="utf-8") + "新\n", encoding="utf-8")
    for ctx, vocab, shown in ((20, src / "vocab.txt", "--context-length 20"), (16, other, str(other))):
        assert train.main(_train_argv(src, tmp_path / "b", ctx, vocab)) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "context length 16" in err and shown in err, err
        assert str(src / "vocab.txt") in err and str(tmp_path / "b" / "manifest.json") in err
    # a built set with --train-img, and a jsonl without it, are refused too
    assert train.main(_train_argv(src, tmp_path / "b", 16, src / "vocab.txt") + ["--train-img", str(src / "lmdb")]) == 2
    assert "drop --train-img" in capsys.readouterr().err
    assert train.main(_train_argv(src, src / "q.jsonl", 16, src / "vocab.txt")) == 2
    assert "--train-img" in capsys.readouterr().err


def test_resize_mode_is_recorded_from_the_flag_or_the_source_store(src, tmp_path):
    """Images decoded here follow --resize; a launch/build_lmdb.py store already holds R×R images and
    its recorded mode travels on (the exported model then records what the weights were trained on)."""
    assert build(src, tmp_path / "cc", "--num-shards", "1", "--resize", "center-crop") == 0
    assert BuiltDataset(tmp_path / "cc").resize == "center-crop"
    assert ImageStore(tmp_path / "cc" / "shards" / "00000" / "images").resize == "center-crop"
    assert build(src, tmp_path / "st", "--num-shards", "1", "--resize", "center-crop", images="lmdb") == 0
    assert BuiltDataset(tmp_path / "st").resize == ImageStore(src / "lmdb").resize == "squash"
