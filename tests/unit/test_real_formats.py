"""The data people have, in its real on-disk formats (tests/real_formats.py makes them from the
synthetic set): Chinese-CLIP's dataset packages and img2dataset's webdataset shards, read by the
builders and scorers; bad samples; distributed builds; mixtures that cannot share a batch."""
import base64
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.built.reader import BuiltDataset
from data.files import InputError
from data.images.shards import expand_shards, key_image_id
from data.images.store import ImageStore
from data.images.transform import preprocess_image
from data.queries import read_queries
from data.synthetic import make_synthetic
from engine.loader.mixture import MixtureDataset, check_mixture
from launch import build_dataset, build_lmdb, evaluate
from tests.real_formats import WEBDATASET_PIP, chinese_clip_package, img2dataset_shards, read_tsv

wds = pytest.importorskip("webdataset", reason=WEBDATASET_PIP)
R = 32


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    make_synthetic(root / "syn", seed=0, sizes={"train": 64, "valid": 30, "test": 4}, image_size=R, workers=1,
                   progress=False)
    chinese_clip_package(root / "syn", root / "cn")
    img2dataset_shards(root / "syn", "train", root / "shards", per_shard=16, gaps=[5], corrupt=[20])
    return root


def _build(args, out, vocab, context=16):
    return build_dataset.main(args + ["--output", str(out), "--vocab", str(vocab), "--resolution", str(R),
                                      "--context-length", str(context), "--workers", "1", "--no-progress"])


def _arrays(built):
    out = {}
    for shard in sorted((Path(built) / "shards").iterdir()):
        for name in ("image_ids", "pair_image", "pair_text", "tokens"):
            out[f"{shard.name}/{name}"] = np.load(shard / f"{name}.npy")
        store = ImageStore(shard / "images")
        out[f"{shard.name}/pixels"] = np.stack(store.get_many(store.ids()))
        store.close()
    return out


# ---- Chinese-CLIP's packages ------------------------------------------------------------------

def test_chinese_clip_texts_read_as_the_same_queries_as_muge_files(src):
    cn, muge = read_queries(src / "cn" / "train_texts.jsonl"), read_queries(src / "syn" / "train_queries.jsonl")
    assert (cn.schema, muge.schema) == ("chinese-clip", "muge")
    assert [(q.query_id, q.text, q.item_ids) for q in cn] == [(q.query_id, q.text, q.item_ids) for q in muge]


def test_a_file_mixing_the_schemas_is_refused_naming_the_line(src, tmp_path, capsys):
    lines = (src / "cn" / "train_texts.jsonl").read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[2])
    lines[2] = json.dumps({"query_id": row["text_id"], "query_text": row["text"], "item_ids": row["image_ids"]})
    mixed = tmp_path / "mixed_texts.jsonl"
    mixed.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"mixed_texts.jsonl:3: a MUGE line .* from line 1"):
        read_queries(mixed)
    assert _build(["--queries", str(mixed), "--images", str(src / "cn" / "lmdb" / "train")], tmp_path / "b",
                  src / "syn" / "vocab.txt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("build_dataset.py: error: ") and "mixed_texts.jsonl:3" in err[-1]
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_a_package_builds_the_same_data_set_as_the_muge_files(src, tmp_path, capsys):
    vocab = src / "syn" / "vocab.txt"
    assert _build(["--queries", str(src / "cn" / "train_texts.jsonl"), "--images", str(src / "cn" / "lmdb" / "train")],
                  tmp_path / "cn", vocab) == 0
    out = capsys.readouterr()
    assert out.out.count("Chinese-CLIP schema (text_id, text, image_ids)") == 1
    assert "pairs: not read" in out.err and "_texts.jsonl" in out.err  # says so, and points to the jsonl
    assert _build(["--queries", str(src / "syn" / "train_queries.jsonl"), "--images",
                   str(src / "syn" / "train_imgs.tsv")], tmp_path / "muge", vocab) == 0
    a, b = _arrays(tmp_path / "cn"), _arrays(tmp_path / "muge")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_pairs_lmdb_of_pickles_is_refused_pointing_to_the_jsonl(src, tmp_path, capsys):
    assert _build(["--queries", str(src / "cn" / "train_texts.jsonl"), "--images",
                   str(src / "cn" / "lmdb" / "train" / "pairs")], tmp_path / "b", src / "syn" / "vocab.txt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "pickles and is never read" in err[-1] and "_texts.jsonl" in err[-1] and "imgs/" in err[-1]


def _cn_score(reference, predictions):
    """Chinese-CLIP's evaluation.py / evaluation_tr.py rule, restated: a query counts at k when any of
    its ground-truth ids is in its first k predictions; fractions, their mean, then x100."""
    stats = [0, 0, 0]
    for qid, truth in reference.items():
        for n, k in enumerate((1, 5, 10)):
            stats[n] += any(t in predictions[qid][:k] for t in set(truth))
    r1, r5, r10 = (s * 1.0 / len(reference) for s in stats)
    return {"score": (r1 + r5 + r10) / 3.0 * 100, "r1": r1 * 100, "r5": r5 * 100, "r10": r10 * 100}


def test_chinese_clip_references_score_exactly_as_its_evaluators(src, tmp_path):
    texts = [json.loads(x) for x in (src / "cn" / "valid_texts.jsonl").read_text(encoding="utf-8").splitlines()]
    images = sorted({i for t in texts for i in t["image_ids"]})
    rng = np.random.default_rng(0)
    t2i = {t["text_id"]: rng.permutation(images)[:10].tolist() for t in texts}
    for t in texts[::3]:  # some hits at various ranks
        if t["image_ids"][0] not in t2i[t["text_id"]]:
            t2i[t["text_id"]][int(rng.integers(0, 10))] = t["image_ids"][0]
    tr = {}
    for t in texts:
        for i in t["image_ids"]:
            tr.setdefault(i, []).append(t["text_id"])
    ids = [t["text_id"] for t in texts]
    i2t = {i: rng.permutation(ids)[:10].tolist() for i in tr}
    for i in list(tr)[::2]:
        if tr[i][0] not in i2t[i]:
            i2t[i][int(rng.integers(0, 10))] = tr[i][0]

    def jsonl(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    pred = jsonl("pred.jsonl", [{"text_id": k, "image_ids": v} for k, v in t2i.items()])
    pred_tr = jsonl("pred_tr.jsonl", [{"image_id": k, "text_ids": v} for k, v in i2t.items()])
    ref_tr = jsonl("valid_texts.tr.jsonl", [{"image_id": k, "text_ids": v} for k, v in tr.items()])
    ref = str(src / "cn" / "valid_texts.jsonl")
    assert evaluate.main([pred, ref, str(tmp_path / "t2i.json")]) == 0
    got = json.loads((tmp_path / "t2i.json").read_text())["scoreJson"]
    want = _cn_score({t["text_id"]: t["image_ids"] for t in texts}, t2i)
    assert [got[k] for k in ("score", "r1", "r5", "r10")] == [want[k] for k in ("score", "r1", "r5", "r10")]
    want_tr = _cn_score(tr, i2t)
    for reference in (ref_tr, ref):  # its .tr.jsonl, or the texts file inverted: the same score
        assert evaluate.main(["--mode", "i2t", "--pred", pred_tr, "--ref", reference, "--out",
                              str(tmp_path / "i2t.json")]) == 0
        got = json.loads((tmp_path / "i2t.json").read_text())["scoreJson"]["i2t"]
        assert [got[k] for k in ("mean_recall", "r1", "r5", "r10")] == [want_tr[k] for k in ("score", "r1", "r5", "r10")]


# ---- webdataset / img2dataset shards ----------------------------------------------------------

def _jpeg(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path, samples):
    with open(path, "wb") as f:
        w = wds.TarWriter(f)
        for s in samples:
            w.write(s)
        w.close()
    return path


GOOD = [{"__key__": f"0000{i}", "jpg": _jpeg(i), "txt": f"红色圆形{i}"} for i in range(4)]
BAD = {  # reason -> (samples of one shard, the key its message names)
    "undecodable image": ([*GOOD[:2], {"__key__": "00009", "jpg": b"\xff\xd8 not a jpeg", "txt": "红色"}], "00009"),
    "empty caption": ([*GOOD[:2], {"__key__": "00009", "jpg": _jpeg(9), "txt": "  "}], "00009"),
    "missing caption": ([*GOOD[:2], {"__key__": "00009", "jpg": _jpeg(9)}], "00009"),
    "missing image": ([*GOOD[:2], {"__key__": "00009", "txt": "红色"}], "00009"),
    "duplicate key": ([*GOOD[:2], {"__key__": "00001", "jpg": _jpeg(9), "txt": "红色"}], "00001"),
    "truncated tar": (GOOD, "00002"),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_sample_fails_naming_file_and_key_or_is_counted_with_skip(src, tmp_path, capsys, reason):
    samples, key = BAD[reason]
    shards = tmp_path / "in"
    shards.mkdir()
    _tar(shards / "00000.tar", GOOD[2:])
    bad = _tar(shards / "00001.tar", samples)
    if reason == "truncated tar":  # cut in the middle of a member's data: the key named is that member's
        full = bad.read_bytes()
        cut = len(full) // 2
        with tarfile.open(fileobj=io.BytesIO(full)) as t:
            key = [m for m in t.getmembers() if m.offset_data < cut][-1].name.split(".")[0]
        bad.write_bytes(full[:cut])
    spec = str(shards / "{00000..00001}.tar")
    vocab = src / "syn" / "vocab.txt"
    assert _build(["--images", spec, "--num-shards", "1"], tmp_path / "fail", vocab) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("build_dataset.py: error: "), err
    assert str(bad) in err[0] and f"key {key}" in err[0], err[0]
    assert not (tmp_path / "fail" / "manifest.json").exists()
    assert not (tmp_path / "fail" / "shards" / "00000" / "shard.json").exists()  # nothing marked done
    assert _build(["--images", spec, "--num-shards", "1", "--on-error", "skip"], tmp_path / "skip", vocab) == 0
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert manifest["skipped_samples"] == {reason: 1} and manifest["complete"] is True
    listed = (tmp_path / "skip" / "shards" / "00000" / "skipped.tsv").read_text().splitlines()
    assert len(listed) == 2 and reason in listed[1] and f"key {key}" in listed[1]


def test_shards_build_the_pairs_webdataset_itself_reads(src, tmp_path):
    """Oracle: webdataset's own reader over the same tars, images decoded by PIL."""
    vocab = src / "syn" / "vocab.txt"
    spec = str(src / "shards" / "{00000..00003}.tar")
    assert _build(["--images", spec, "--on-error", "skip"], tmp_path / "b", vocab) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["num_shards"] == 4 and manifest["skipped_samples"] == {"undecodable image": 1}
    assert manifest["samples"] == 63 and manifest["pairs"] == 62 and manifest["image_ids"]["hashed"] == 0
    want = {}
    for sample in wds.WebDataset(expand_shards(spec), shardshuffle=False):
        key = sample["__key__"]
        if key == "000010004":  # the corrupt JPEG (sample 20: shard 1, index 4)
            continue
        pixels = preprocess_image(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), R)
        want[int(key)] = (sample["txt"].decode("utf-8"), pixels)
    assert 5 not in want and len(want) == 62  # the failed download is a gap in the keys
    ds = BuiltDataset(tmp_path / "b")
    from data.tokenizer import load_tokenizer, tokenize

    tok = load_tokenizer(str(vocab))
    got = {}
    for shard, path in enumerate(sorted((tmp_path / "b" / "shards").iterdir())):
        ids, pair_image = np.load(path / "image_ids.npy"), np.load(path / "pair_image.npy")
        start = sum(ds.shard_pair_counts[:shard])
        for j, row in enumerate(pair_image):
            item = ds[start + j]
            got[int(ids[row])] = (item["input_ids"], item["image"].numpy())
    assert got.keys() == want.keys()
    for image_id, (caption, pixels) in want.items():
        assert np.array_equal(got[image_id][1], pixels)
        assert np.array_equal(got[image_id][0].numpy(), tokenize(tok, [caption], 16)[0].numpy())


def test_distributed_jobs_read_only_their_input_shards_and_equal_one_build(src, tmp_path, capsys):
    vocab = src / "syn" / "vocab.txt"
    shards = tmp_path / "in"
    shutil.copytree(src / "shards", shards)
    spec = str(shards / "{00000..00003}.tar")
    args = ["--images", spec, "--num-shards", "2", "--on-error", "skip"]
    assert build_dataset.main(args + ["--output", str(tmp_path / "one"), "--vocab", str(vocab), "--resolution",
                                      str(R), "--context-length", "16", "--workers", "2", "--no-progress"]) == 0
    for i in (0, 1):  # job i must not open job 1 - i's inputs (j % 2 != i): make them unreadable as tars
        saved = {j: (shards / f"{j:05d}.tar").read_bytes() for j in (1 - i, 3 - i)}
        for j in saved:
            (shards / f"{j:05d}.tar").write_bytes(b"not a tar")
        assert _build(args + ["--shard-index", str(i)], tmp_path / "jobs", vocab) == 0
        for j, data in saved.items():
            (shards / f"{j:05d}.tar").write_bytes(data)
    assert _build(args + ["--finalize"], tmp_path / "jobs", vocab) == 0
    a, b = _arrays(tmp_path / "one"), _arrays(tmp_path / "jobs")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    one, jobs = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "jobs"))
    assert (one["pairs"], one["skipped_samples"]) == (jobs["pairs"], jobs["skipped_samples"]) == (62, {"undecodable image": 1})


def test_text_keys_are_hashed_and_a_json_field_may_hold_several_captions(src, tmp_path):
    samples = [{"__key__": "photo_a", "jpg": _jpeg(1), "json": json.dumps({"captions": ["红色", "红色圆形"]})},
               {"__key__": "photo_b", "jpg": _jpeg(2), "json": json.dumps({"captions": ["红色"]})},
               {"__key__": "00042", "jpg": _jpeg(3), "json": json.dumps({"captions": "蓝色"})}]
    _tar(tmp_path / "a.tar", samples)
    assert _build(["--images", str(tmp_path / "*.tar"), "--caption-from", "json:captions"], tmp_path / "b",
                  src / "syn" / "vocab.txt") == 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["pairs"] == 4 and m["images"] == 3 and m["image_ids"]["hashed"] == 2 and m["shards"][0]["texts"] == 3
    want = sorted([42] + [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") & (2 ** 63 - 1)
                          for k in ("photo_a", "photo_b")])
    assert np.load(tmp_path / "b" / "shards" / "00000" / "image_ids.npy").tolist() == want
    assert key_image_id("00042") == (42, False) and key_image_id("photo_a")[1]


def test_build_lmdb_reads_shards_as_it_reads_the_tsv(src, tmp_path):
    img2dataset_shards(src / "syn", "valid", tmp_path / "valid", per_shard=8, key_of=lambda s, i, image_id: f"{image_id:09d}")
    assert build_lmdb.main(["--input", str(tmp_path / "valid" / "*.tar"), "--output", str(tmp_path / "a"),
                            "--resolution", str(R), "--workers", "1", "--no-progress"]) == 0
    assert build_lmdb.main(["--input", str(src / "syn" / "valid_imgs.tsv"), "--output", str(tmp_path / "b"),
                            "--resolution", str(R), "--workers", "1", "--no-progress"]) == 0
    a, b = ImageStore(tmp_path / "a"), ImageStore(tmp_path / "b")
    assert a.ids() == b.ids() == sorted(read_tsv(src / "syn" / "valid_imgs.tsv"))
    assert np.array_equal(np.stack(a.get_many(a.ids())), np.stack(b.get_many(b.ids())))


def test_shard_specs_expand_braces_globs_and_lists_in_order(tmp_path):
    for n in range(12):
        (tmp_path / f"{n:05d}.tar").write_bytes(b"")
    assert [Path(p).name for p in expand_shards(str(tmp_path / "{00009..00011}.tar"))] == \
        ["00009.tar", "00010.tar", "00011.tar"]
    both = expand_shards(str(tmp_path / "0000[01].tar") + "::" + str(tmp_path / "{00010,00003}.tar"))
    assert [Path(p).name for p in both] == ["00000.tar", "00001.tar", "00010.tar", "00003.tar"]
    with pytest.raises(InputError, match="00012.tar: shard not found"):
        expand_shards(str(tmp_path / "{00010..00012}.tar"))
    with pytest.raises(InputError, match="no shard matches"):
        expand_shards(str(tmp_path / "*.tgz"))


# ---- mixtures ---------------------------------------------------------------------------------

def test_a_mixture_is_refused_across_context_lengths_or_resolutions_naming_both(src, tmp_path):
    vocab = src / "syn" / "vocab.txt"
    q, tsv = str(src / "syn" / "train_queries.jsonl"), str(src / "syn" / "train_imgs.tsv")
    assert _build(["--queries", q, "--images", tsv], tmp_path / "a", vocab) == 0
    assert _build(["--queries", q, "--images", tsv], tmp_path / "c20", vocab, context=20) == 0
    assert build_dataset.main(["--queries", q, "--images", tsv, "--output", str(tmp_path / "r16"), "--vocab",
                               str(vocab), "--resolution", "16", "--context-length", "16", "--workers", "1",
                               "--no-progress"]) == 0
    for other, what in (("c20", "context length 16.*context length 20"), ("r16", "resolution 32.*resolution 16")):
        with pytest.raises(InputError, match=f"{tmp_path / 'a'} \\({what}"):
            check_mixture([(str(tmp_path / "a"), 1.0), (str(tmp_path / other), 3.0)], str(vocab), 16)
    with pytest.raises(InputError, match="named twice"):
        check_mixture([(str(tmp_path / "a"), 1.0), (str(tmp_path / "a") + "/", 3.0)], str(vocab), 16)
    shutil.copytree(tmp_path / "a", tmp_path / "a2")
    check_mixture([(str(tmp_path / "a"), 1.0), (str(tmp_path / "a2"), 3.0)], str(vocab), 16)
    mix = MixtureDataset([(str(tmp_path / "a"), 1.0), (str(tmp_path / "a2"), 3.0)])
    shutil.copytree(tmp_path / "a", tmp_path / "a3")  # py-lmdb opens a store once per process: read a copy
    one = BuiltDataset(tmp_path / "a3")
    n = len(one)
    assert len(mix) == 2 * n
    for i in (0, n - 1, n, 2 * n - 1):  # the concatenation: index n + j is the second data set's j
        a, b = mix[i], one[i % n]
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in ("image", "input_ids"))
