"""Real-format samples made from the synthetic data set, for the tests:

- a Chinese-CLIP dataset package ({split}_texts.jsonl, {split}_imgs.tsv, lmdb/{split}/imgs and
  lmdb/{split}/pairs), written by the steps Chinese-CLIP's cn_clip/preprocess/build_lmdb_dataset.py
  takes: imgs holds key str(image_id) -> the base64 text and `num_images`; pairs holds key str(index) ->
  pickle of (image_id, text_id, text) per (text, image) and `num_samples`;
- webdataset shards in img2dataset's layout, written by webdataset's own TarWriter as img2dataset
  does ({key}.jpg, {key}.txt, {key}.json per sample; {shard}_stats.json beside; keys
  f"{shard:05d}{index:04d}"), with failed downloads leaving gaps in the keys. (img2dataset's
  {shard}.parquet needs pyarrow and is never read by the builder, so it is not written.)
"""
from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import lmdb

WEBDATASET_PIP = "pip install webdataset==1.0.2"


def read_tsv(path: Path) -> Dict[int, bytes]:
    """{image id: base64 text} of a MUGE *_imgs.tsv."""
    out = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            i, b64 = line.split(b"\t")
            out[int(i)] = b64
    return out


def chinese_clip_package(synth: Path, out: Path, splits: Sequence[str] = ("train", "valid")) -> Path:
    """The synthetic MUGE files rewritten as a Chinese-CLIP dataset package under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        rows = [json.loads(x) for x in (synth / f"{split}_queries.jsonl").read_text(encoding="utf-8").splitlines()]
        with open(out / f"{split}_texts.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"text_id": r["query_id"], "text": r["query_text"],
                                    "image_ids": r["item_ids"]}, ensure_ascii=False) + "\n")
        (out / f"{split}_imgs.tsv").write_bytes((synth / f"{split}_imgs.tsv").read_bytes())
        split_dir = out / "lmdb" / split
        split_dir.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(split_dir / "pairs"), map_size=1 << 26)
        with env.begin(write=True) as txn:
            n = 0
            for r in rows:
                for image_id in r["item_ids"]:
                    txn.put(str(n).encode(), pickle.dumps((image_id, r["query_id"], r["query_text"])))
                    n += 1
            txn.put(b"num_samples", str(n).encode())
        env.close()
        images = read_tsv(synth / f"{split}_imgs.tsv")
        env = lmdb.open(str(split_dir / "imgs"), map_size=1 << 28)
        with env.begin(write=True) as txn:
            for image_id, b64 in images.items():
                txn.put(str(image_id).encode(), b64)
            txn.put(b"num_images", str(len(images)).encode())
        env.close()
    return out


def img2dataset_shards(synth: Path, split: str, out: Path, per_shard: int = 16, gaps: Sequence[int] = (),
                       corrupt: Sequence[int] = (), key_of=None, limit: Optional[int] = None) -> List[Path]:
    """The split's (image, caption) pairs as img2dataset's webdataset output. Sample number i (in
    tsv order) lands in shard i // per_shard; `gaps`: sample numbers whose download "failed" (absent
    from the tar, a gap in the keys); `corrupt`: sample numbers whose JPEG bytes are cut short.
    key_of(shard, index, image_id) names a sample (default img2dataset's f"{shard:05d}{index:04d}")."""
    import webdataset as wds

    captions = {}
    for line in (synth / f"{split}_queries.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        for image_id in r["item_ids"]:
            captions.setdefault(image_id, r["query_text"])
    images = list(read_tsv(synth / f"{split}_imgs.tsv").items())[:limit]
    key_of = key_of or (lambda shard, index, image_id: f"{shard:05d}{index:04d}")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range((len(images) + per_shard - 1) // per_shard):
        path = out / f"{shard:05d}.tar"
        ok = failed = 0
        with open(path, "wb") as f:
            w = wds.TarWriter(f)
            for index in range(per_shard):
                i = shard * per_shard + index
                if i >= len(images):
                    break
                if i in gaps:
                    failed += 1
                    continue
                image_id, b64 = images[i]
                jpg = base64.urlsafe_b64decode(b64 + b"=" * (-len(b64) % 4))
                if i in corrupt:
                    jpg = jpg[: len(jpg) // 3]
                key = key_of(shard, index, image_id)
                meta = {"url": f"http://example.invalid/{image_id}.jpg", "caption": captions[image_id], "key": key,
                        "status": "success", "error_message": None, "width": 64, "height": 64}
                w.write({"__key__": key, "jpg": jpg, "txt": captions[image_id], "json": json.dumps(meta, indent=4)})
                ok += 1
            w.close()
        (out / f"{shard:05d}_stats.json").write_text(json.dumps({"count": ok + failed, "successes": ok,
                                                                  "failed_to_download": failed}))
        paths.append(path)
    return paths
