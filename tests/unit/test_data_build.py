"""The store builder: every input format, corrupt input under fail/skip, resume after interruption."""
import base64
import io
import subprocess
import sys

import lmdb
import numpy as np
import pytest
from PIL import Image

from data.images import build_store as build_mod
from data.images.build_store import build_store
from data.images.sources import BuildError, decode_base64
from data.files import InputError
from data.images.transform import preprocess_image
from data.images.store import ImageStore

R = 16


def _img(seed, w=40, h=30):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _expected(jpeg_bytes):
    # Oracle: decode the file with PIL directly, then the transform (itself checked against torchvision).
    return preprocess_image(Image.open(io.BytesIO(jpeg_bytes)).convert("RGB"), R)


def _tsv(path, items, urlsafe=True):
    enc = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    with open(path, "wb") as f:
        for image_id, data in items:
            f.write(b"%d\t%s\n" % (image_id, enc(data) if isinstance(data, bytes) else data.encode()))
    return path


@pytest.fixture
def jpegs():
    # Chosen so standard and URL-safe base64 differ ('+'/'/' vs '-'/'_' occur in the encodings).
    out = {1000 + i: _jpeg(_img(i, 30 + 3 * i, 50 - 2 * i)) for i in range(12)}
    assert any(b"-" in base64.urlsafe_b64encode(d) for d in out.values())
    return out


def _assert_store(path, jpegs):
    store = ImageStore(path)
    assert store.ids() == sorted(jpegs)
    assert store.manifest["complete"] and store.manifest["count"] == len(jpegs)
    for i, data in jpegs.items():
        assert store.get(i).tobytes() == _expected(data).tobytes()
    return store


@pytest.mark.parametrize("urlsafe", [True, False])
@pytest.mark.parametrize("workers", [0, 2])
def test_tsv_round_trip(tmp_path, jpegs, urlsafe, workers):
    tsv = _tsv(tmp_path / "train_imgs.tsv", jpegs.items(), urlsafe)
    r = build_store(tsv, tmp_path / "db", R, workers=workers, chunk_size=5, progress=False)
    assert r.written == len(jpegs) and not r.skipped
    store = _assert_store(tmp_path / "db", jpegs)
    assert store.manifest["source"].startswith("tsv:")


def test_base64_both_alphabets_and_missing_padding():
    data = bytes(range(256)) * 3
    for enc in (base64.b64encode(data), base64.urlsafe_b64encode(data), base64.urlsafe_b64encode(data).rstrip(b"=")):
        assert decode_base64(enc) == data
    with pytest.raises(InputError, match="base64"):
        decode_base64(b"abc$%^&*")


def test_folder_input(tmp_path, jpegs):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for k, (i, data) in enumerate(jpegs.items()):
        (tmp_path / "imgs" / ("sub" if k % 2 else "") / f"{i}.jpg").write_bytes(data)
    (tmp_path / "imgs" / "notes.txt").write_text("ignored: not an image extension")
    build_store(tmp_path / "imgs", tmp_path / "db", R, workers=0, progress=False)
    _assert_store(tmp_path / "db", jpegs)


def _chinese_clip_lmdb(root, jpegs, extra=()):
    # Chinese-CLIP's layout: <root>/imgs LMDB, key str(id), value base64 JPEG; <root>/pairs holds pickles.
    root.mkdir(parents=True)
    env = lmdb.open(str(root / "imgs"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, data in jpegs.items():
            txn.put(str(i).encode(), base64.urlsafe_b64encode(data))
        txn.put(b"num_images", str(len(jpegs)).encode())
        for k, v in extra:
            txn.put(k, v)
    env.close()
    env = lmdb.open(str(root / "pairs"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        # If the builder ever unpickled this, the test would notice: it is not even a valid pickle.
        txn.put(b"0", b"cos\nsystem\n(S'exit 1'\ntR.")
    env.close()


@pytest.mark.parametrize("point_at", ["parent", "imgs"])
def test_chinese_clip_lmdb_imports(tmp_path, jpegs, point_at):
    _chinese_clip_lmdb(tmp_path / "cc", jpegs)
    src = tmp_path / "cc" if point_at == "parent" else tmp_path / "cc" / "imgs"
    build_store(src, tmp_path / "db", R, workers=0, progress=False)
    store = _assert_store(tmp_path / "db", jpegs)
    assert store.manifest["source"].startswith("chinese-clip-lmdb:")


# ---- corrupt input -----------------------------------------------------------------------------

def _bad_tsv(tmp_path, jpegs, bad_line):
    """A tsv with a bad line as line 4 (image id 77)."""
    items = list(jpegs.items())
    path = tmp_path / "bad_imgs.tsv"
    with open(path, "wb") as f:
        for k, (i, data) in enumerate(items):
            if k == 3:
                f.write(bad_line)
            f.write(b"%d\t%s\n" % (i, base64.urlsafe_b64encode(data)))
    return path


BAD_LINES = {
    "corrupt base64": b"77\tnot*base64*at*all\n",
    "non-image": b"77\t" + base64.urlsafe_b64encode(b"this is plain text, not a JPEG") + b"\n",
    "truncated line": b"77\n",
    "truncated jpeg": b"77\t" + base64.urlsafe_b64encode(_jpeg(_img(99)))[:200] + b"\n",
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_corrupt_input_fails_naming_id_and_line(tmp_path, jpegs, kind):
    tsv = _bad_tsv(tmp_path, jpegs, BAD_LINES[kind])
    with pytest.raises(BuildError) as e:
        build_store(tsv, tmp_path / "db", R, workers=0, chunk_size=2, progress=False)
    msg = str(e.value)
    assert f"{tsv}:4:" in msg and "image id 77" in msg
    # What came before the bad line is kept, but the store is not marked complete.
    with pytest.raises(InputError, match="did not finish"):
        ImageStore(tmp_path / "db")


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_corrupt_input_skipped_and_reported(tmp_path, jpegs, kind):
    tsv = _bad_tsv(tmp_path, jpegs, BAD_LINES[kind])
    r = build_store(tsv, tmp_path / "db", R, on_error="skip", workers=2, chunk_size=3, progress=False)
    assert [s[0] for s in r.skipped] == ["77"]
    lines = r.report_path.read_text().splitlines()
    assert lines[0].startswith("image_id") and lines[1].startswith(f"77\t{tsv}:4")
    _assert_store(tmp_path / "db", jpegs)


def test_duplicate_id_and_bad_id(tmp_path, jpegs):
    items = list(jpegs.items())
    tsv = _tsv(tmp_path / "dup.tsv", items + [items[0]])
    with pytest.raises(BuildError, match=f"dup.tsv:{len(items) + 1}: image id {items[0][0]}: duplicate"):
        build_store(tsv, tmp_path / "db", R, workers=0, progress=False)
    with open(tmp_path / "badid.tsv", "wb") as f:
        f.write(b"abc\t" + base64.b64encode(items[0][1]) + b"\n")
    with pytest.raises(BuildError, match="badid.tsv:1.*not an integer"):
        build_store(tmp_path / "badid.tsv", tmp_path / "db2", R, workers=0, progress=False)


def test_cli_fail_exits_nonzero_and_skip_reports(tmp_path, jpegs, repo_root):
    tsv = _bad_tsv(tmp_path, jpegs, BAD_LINES["non-image"])
    cmd = [sys.executable, str(repo_root / "launch" / "build_lmdb.py"), "--input", str(tsv),
           "--resolution", str(R), "--workers", "1", "--no-progress"]
    p = subprocess.run(cmd + ["--output", str(tmp_path / "a")], capture_output=True, text=True, timeout=360)
    assert p.returncode != 0 and f"{tsv}:4: image id 77" in p.stderr
    p = subprocess.run(cmd + ["--output", str(tmp_path / "b"), "--on-error", "skip"], capture_output=True,
                       text=True, timeout=360)
    assert p.returncode == 0, p.stderr
    assert "skipped 1 bad image" in p.stdout and str(tmp_path / "b" / "skipped.tsv") in p.stdout


# ---- resume --------------------------------------------------------------------------------------

def test_interrupted_build_resumes_and_completes(tmp_path, jpegs, monkeypatch):
    tsv = _tsv(tmp_path / "t.tsv", jpegs.items())
    real_put = build_mod.ImageStoreWriter.put_many
    calls = []

    def put_then_die(self, items):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-build
        return real_put(self, items)

    monkeypatch.setattr(build_mod.ImageStoreWriter, "put_many", put_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_store(tsv, tmp_path / "db", R, workers=2, chunk_size=3, progress=False)
    monkeypatch.setattr(build_mod.ImageStoreWriter, "put_many", real_put)
    with pytest.raises(InputError, match="did not finish"):
        ImageStore(tmp_path / "db")
    r = build_store(tsv, tmp_path / "db", R, workers=2, chunk_size=3, progress=False)
    assert r.already_present == 6 and r.written == len(jpegs) - 6  # two chunks of 3 had been committed
    _assert_store(tmp_path / "db", jpegs)
    # A rerun of a finished build writes nothing and leaves it complete.
    r = build_store(tsv, tmp_path / "db", R, workers=0, progress=False)
    assert (r.written, r.already_present) == (0, len(jpegs))
    _assert_store(tmp_path / "db", jpegs)


def test_resume_with_another_resolution_is_refused(tmp_path, jpegs):
    tsv = _tsv(tmp_path / "t.tsv", jpegs.items())
    build_store(tsv, tmp_path / "db", R, workers=0, progress=False)
    with pytest.raises(InputError, match="resolution"):
        build_store(tsv, tmp_path / "db", R * 2, workers=0, progress=False)


def test_duplicate_id_is_refused_after_an_interrupted_build(tmp_path, jpegs, monkeypatch, repo_root):
    """The first copy of a repeated id is committed before the interruption; the resumed build must
    refuse its second copy exactly as a clean build does (not count it 'already present')."""
    items = list(jpegs.items())
    dup_line = len(items) + 1
    tsv = _tsv(tmp_path / "dup.tsv", items + [items[0]])  # items[0] lands in the first chunk
    real_put = build_mod.ImageStoreWriter.put_many

    def put_once_then_die(self, batch):
        real_put(self, batch)
        raise KeyboardInterrupt  # the first chunk is committed, then the build is killed

    monkeypatch.setattr(build_mod.ImageStoreWriter, "put_many", put_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_store(tsv, tmp_path / "db", R, workers=0, chunk_size=3, progress=False)
    monkeypatch.setattr(build_mod.ImageStoreWriter, "put_many", real_put)
    with build_mod.ImageStoreWriter(tmp_path / "db", R) as w:
        assert items[0][0] in w.existing_ids()
    cmd = [sys.executable, str(repo_root / "launch" / "build_lmdb.py"), "--input", str(tsv), "--output",
           str(tmp_path / "db"), "--resolution", str(R), "--workers", "0", "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"dup.tsv:{dup_line}: image id {items[0][0]}: duplicate image id" in p.stderr
    with pytest.raises(InputError, match="did not finish"):
        ImageStore(tmp_path / "db")  # still marked incomplete: the refused build did not finish it
    # --on-error skip lists the repeat in the report, as a clean build does
    r = build_store(tsv, tmp_path / "db", R, workers=0, on_error="skip", progress=False)
    assert [s[0] for s in r.skipped] == [str(items[0][0])] and f"dup.tsv:{dup_line}" in r.skipped[0][1]
    _assert_store(tmp_path / "db", jpegs)


@pytest.mark.parametrize("resize", ["squash", "center-crop"])
def test_resize_mode_is_applied_and_recorded(tmp_path, jpegs, resize):
    tsv = _tsv(tmp_path / "t.tsv", jpegs.items())
    from launch.build_lmdb import main as build_main

    args = ["--input", str(tsv), "--output", str(tmp_path / "db"), "--resolution", str(R), "--workers", "0",
            "--no-progress"] + (["--resize", resize] if resize != "squash" else [])
    assert build_main(args) == 0
    store = ImageStore(tmp_path / "db")
    assert store.manifest["resize"] == resize and store.resize == resize
    for i, data in jpegs.items():  # the images are 30-63 x 28-50: the modes give different pixels
        want = preprocess_image(Image.open(io.BytesIO(data)).convert("RGB"), R, resize=resize)
        assert store.get(i).tobytes() == want.tobytes()
    store.close()
    other = "center-crop" if resize == "squash" else "squash"
    with pytest.raises(InputError, match=f"resized by {resize}, not {other}"):
        build_store(tsv, tmp_path / "db", R, workers=0, progress=False, resize=other)


def test_store_without_resize_key_reads_as_center_crop(tmp_path, jpegs):
    # Stores built before the key existed were centre-cropped; resuming one keeps that mode.
    import json

    from data.images.store import MANIFEST_KEY

    tsv = _tsv(tmp_path / "t.tsv", jpegs.items())
    build_store(tsv, tmp_path / "db", R, workers=0, progress=False, resize="center-crop")
    env = lmdb.open(str(tmp_path / "db"))
    with env.begin(write=True) as txn:
        manifest = json.loads(txn.get(MANIFEST_KEY))
        del manifest["resize"]
        txn.put(MANIFEST_KEY, json.dumps(manifest).encode())
    env.close()
    assert ImageStore(tmp_path / "db").resize == "center-crop"
    with pytest.raises(InputError, match="resized by center-crop"):
        build_store(tsv, tmp_path / "db", R, workers=0, progress=False)
    build_store(tsv, tmp_path / "db", R, workers=0, progress=False, resize="center-crop")
