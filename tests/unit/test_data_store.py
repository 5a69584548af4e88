"""The LMDB image store: byte-exact round trip, manifest, map growth, fork safety, incomplete builds."""
import json
import multiprocessing as mp
import pickle

import lmdb
import numpy as np
import pytest

from data.files import InputError
from data.images.transform import IMAGE_MEAN, IMAGE_STD
from data.images.store import MANIFEST_KEY, ImageStore, ImageStoreWriter


def _images(n, r, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**7, size=n, replace=False).tolist()
    return ids, rng.integers(0, 256, size=(n, 3, r, r), dtype=np.uint8)


def _write(path, ids, arrs, r, **kw):
    with ImageStoreWriter(path, r, source="test", **kw) as w:
        w.put_many(zip(ids, arrs))
        return w.finish()


def test_round_trip_is_byte_exact(tmp_path):
    ids, arrs = _images(50, 8)
    _write(tmp_path / "s", ids, arrs, 8)
    store = ImageStore(tmp_path / "s")
    assert len(store) == 50 and store.ids() == sorted(ids)
    for i, a in zip(ids, arrs):
        got = store.get(i)
        assert got.dtype == np.uint8 and got.shape == (3, 8, 8)
        assert got.tobytes() == a.tobytes()
    np.testing.assert_array_equal(store.get_many(ids[::-1]), arrs[::-1])
    assert ids[0] in store and (max(ids) + 1) not in store
    assert store.missing([ids[1], -5, ids[2], -5, 123456789]) == [-5, 123456789]


def test_manifest_and_raw_layout(tmp_path):
    ids, arrs = _images(3, 4)
    _write(tmp_path / "s", ids, arrs, 4)
    m = ImageStore(tmp_path / "s").manifest
    assert (m["resolution"], m["count"], m["dtype"], m["shape"], m["complete"]) == (4, 3, "uint8", [3, 4, 4], True)
    assert m["mean"] == list(IMAGE_MEAN) and m["std"] == list(IMAGE_STD) and m["source"] == "test"
    # The documented on-disk layout, read with plain lmdb: decimal keys, raw C-order bytes, JSON manifest.
    env = lmdb.open(str(tmp_path / "s"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(str(ids[0]).encode()) == arrs[0].tobytes()
        assert json.loads(txn.get(MANIFEST_KEY))["count"] == 3
        assert txn.stat()["entries"] == 4
    env.close()


def test_map_grows_when_full(tmp_path):
    ids, arrs = _images(40, 64)  # 40 × 12 KiB, far over a 64 KiB initial map
    _write(tmp_path / "s", ids, arrs, 64, map_size=64 * 1024)
    store = ImageStore(tmp_path / "s")
    assert len(store) == 40
    assert all(store.get(i).tobytes() == a.tobytes() for i, a in zip(ids, arrs))


def test_incomplete_store_is_refused(tmp_path):
    ids, arrs = _images(3, 4)
    w = ImageStoreWriter(tmp_path / "s", 4)
    w.put_many(zip(ids, arrs))
    w.close()  # no finish(): an interrupted build
    with pytest.raises(InputError, match="did not finish"):
        ImageStore(tmp_path / "s")


def test_writer_rejects_wrong_shape_and_resolution(tmp_path):
    ids, arrs = _images(2, 4)
    _write(tmp_path / "s", ids, arrs, 4)
    with pytest.raises(InputError, match="resolution 4"):
        ImageStoreWriter(tmp_path / "s", 8)
    with ImageStoreWriter(tmp_path / "t", 4) as w:
        with pytest.raises(ValueError):
            w.put_many([(1, np.zeros((3, 5, 5), np.uint8))])


def test_not_a_store(tmp_path):
    with pytest.raises(InputError, match="no data.mdb"):
        ImageStore(tmp_path)
    env = lmdb.open(str(tmp_path / "foreign"))
    with env.begin(write=True) as txn:
        txn.put(b"1", b"abc")
    env.close()
    with pytest.raises(InputError, match="no manifest"):
        ImageStore(tmp_path / "foreign")


def _child_read(store, ids, q):
    q.put([store.get(i).tobytes() for i in ids])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_store_is_usable_in_forked_and_spawned_workers(tmp_path, method):
    ids, arrs = _images(5, 4)
    _write(tmp_path / "s", ids, arrs, 4)
    store = ImageStore(tmp_path / "s")
    store.get(ids[0])  # the parent has an open environment before the fork
    ctx = mp.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=_child_read, args=(store, ids, q))
    p.start()
    got = q.get(timeout=180)
    p.join(180)
    assert p.exitcode == 0
    assert got == [a.tobytes() for a in arrs]
    assert store.get(ids[1]).tobytes() == arrs[1].tobytes()  # the parent still reads
    assert pickle.loads(pickle.dumps(store))._env is None


def _damaged_copies(tmp_path):
    """A healthy store and three damaged copies of it: cut in half (a partial copy; reading it
    used to SIGBUS the process), meta pages wiped, every page after the metas overwritten."""
    import os
    import shutil

    ids, arrs = _images(40, 32)
    _write(tmp_path / "ok", ids, arrs, 32)
    size = (tmp_path / "ok" / "data.mdb").stat().st_size
    out = {}
    for name in ("truncated", "no_header", "garbage"):
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        out[name] = tmp_path / name
    os.truncate(out["truncated"] / "data.mdb", size // 2)
    with open(out["no_header"] / "data.mdb", "r+b") as f:
        f.write(b"\0" * 8192)
    with open(out["garbage"] / "data.mdb", "r+b") as f:
        f.seek(8192)
        f.write(np.random.default_rng(0).integers(0, 256, size - 8192, dtype=np.uint8).tobytes())
    return ids, out


def test_damaged_store_is_refused_naming_it_and_the_rebuild(tmp_path):
    ids, bad = _damaged_copies(tmp_path)
    assert ImageStore(tmp_path / "ok").missing(ids) == []  # the check passes a healthy store
    expect = {"truncated": "truncated store", "no_header": "header unreadable", "garbage": "damaged store"}
    for name, path in bad.items():
        with pytest.raises(InputError) as e:
            store = ImageStore(path)
            store.missing(ids)  # the garbage copy opens (LMDB has no checksums) and fails on the read
        msg = str(e.value)
        assert msg.startswith(f"{path / 'data.mdb'}: ") and expect[name] in msg, msg
        assert f"launch/build_lmdb.py --input <the same images> --output {path}" in msg, msg
    with pytest.raises(InputError, match="truncated store"):  # a resumed build must not write into it
        ImageStoreWriter(bad["truncated"], 32)
