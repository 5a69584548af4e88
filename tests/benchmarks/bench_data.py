"""Images per second into a training batch, and bytes per image, for three ways of feeding images:

  lmdb   our store: uint8 [3,R,R] read from LMDB (normalised later, on the device)
  jpeg   decode + resize + centre crop of the JPEG on the fly (online preprocessing)
  npz    a float32 npz of pre-normalised images, like the seed's (the whole file is loaded into RAM,
         np.load cannot memory-map an npz; its load time is printed separately)

All on a warm cache, through torch DataLoader with 0 (in-process), 1 and 2 worker processes. The ratios
are measured side by side in one run because these machines are noisy. A script, not a test:

  python tests/benchmarks/bench_data.py [--images 1000] [--resolution 224] [--source-size 500]
"""
import argparse
import base64
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from data.images.build_store import build_store  # noqa: E402
from data.images.datasets import ImageDataset  # noqa: E402
from data.images.transform import IMAGE_MEAN, IMAGE_STD, load_and_preprocess  # noqa: E402
from data.images.store import ImageStore  # noqa: E402


def photo_like_jpegs(n_unique, size, seed=0):
    """Smooth colour fields with texture, so JPEG sizes and decode costs resemble photos."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_unique):
        small = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.normal(0, 12, size=img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class JpegDataset(Dataset):
    def __init__(self, jpegs, resolution):
        self.jpegs, self.resolution = jpegs, resolution

    def __len__(self):
        return len(self.jpegs)

    def __getitem__(self, i):
        return {"image": torch.from_numpy(load_and_preprocess(self.jpegs[i], self.resolution))}


class NpzDataset(Dataset):
    def __init__(self, array):
        self.array = array

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        return {"image": torch.from_numpy(self.array[i])}


def images_per_second(dataset, workers, batch_size, max_images, seed=0):
    """Steady-state rate: the clock starts when the first batch arrives (worker start-up excluded)."""
    if max_images < 2 * batch_size:
        raise SystemExit(f"need at least 2 batches ({2 * batch_size} images) per measurement")
    # Random order, cycling over the data set when more images are asked for than it holds.
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(dataset), generator=g)
                       for _ in range(-(-max_images // len(dataset)))])[:max_images].tolist()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                        prefetch_factor=4 if workers else None)
    count, t0 = 0, None
    for batch in loader:
        if t0 is None:
            t0 = time.perf_counter()
            continue
        count += batch["image"].shape[0]
    return count / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="images in the lmdb/npz stores")
    p.add_argument("--read-images", type=int, default=6400, help="images read per lmdb/npz measurement")
    p.add_argument("--jpeg-images", type=int, default=320, help="images decoded per jpeg measurement")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--source-size", type=int, default=500, help="side of the source JPEGs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    a = p.parse_args()
    torch.set_num_threads(1)
    workers = [int(w) for w in a.workers.split(",")]
    tmp = tempfile.TemporaryDirectory(dir=a.dir)
    d = Path(tmp.name)
    R = a.resolution

    print(f"setup: {a.images} images, {a.source_size}px JPEG sources -> {R}px, batch {a.batch_size}, "
          f"{os.cpu_count()} cpus, torch threads 1", flush=True)
    unique = photo_like_jpegs(64, a.source_size)
    jpegs = [unique[i % len(unique)] for i in range(a.images)]
    with open(d / "imgs.tsv", "wb") as f:
        for i, data in enumerate(jpegs):
            f.write(b"%d\t%s\n" % (i, base64.urlsafe_b64encode(data)))
    t = time.perf_counter()
    build_store(d / "imgs.tsv", d / "lmdb", R, workers=None, progress=False)
    build_rate = a.images / (time.perf_counter() - t)
    store = ImageStore(d / "lmdb")
    ids = store.ids()
    lmdb_bytes = (d / "lmdb" / "data.mdb").stat().st_size / a.images

    # The seed's format: normalised float32, all images in one npz.
    mean = np.array(IMAGE_MEAN, np.float32).reshape(3, 1, 1)
    std = np.array(IMAGE_STD, np.float32).reshape(3, 1, 1)
    arr = np.stack([(store.get(i).astype(np.float32) / 255 - mean) / std for i in ids])
    np.savez(d / "images.npz", images=arr)
    del arr
    npz_bytes = (d / "images.npz").stat().st_size / a.images
    t = time.perf_counter()
    npz_array = np.load(d / "images.npz")["images"]
    npz_load_s = time.perf_counter() - t

    lmdb_ds, jpeg_ds, npz_ds = ImageDataset(store, ids), JpegDataset(jpegs, R), NpzDataset(npz_array)
    for ds in (lmdb_ds, npz_ds):  # warm the page cache and the allocator
        images_per_second(ds, 0, a.batch_size, len(ds))

    rows = []
    for w in workers:
        jpeg = images_per_second(jpeg_ds, w, a.batch_size, a.jpeg_images)
        lm = images_per_second(lmdb_ds, w, a.batch_size, a.read_images)
        nz = images_per_second(npz_ds, w, a.batch_size, a.read_images)
        rows += [("lmdb (ours, uint8)", w, lm, lmdb_bytes, lm / jpeg), ("jpeg decode+resize", w, jpeg,
                 np.mean([len(j) for j in unique]), 1.0), ("npz float32 (seed)", w, nz, npz_bytes, nz / jpeg)]
        print(f"  measured workers={w}", flush=True)

    print(f"\n{'loader':<22}{'workers':>8}{'img/s':>11}{'bytes/img':>12}{'x jpeg':>9}")
    for name, w, rate, nbytes, ratio in rows:
        print(f"{name:<22}{w:>8}{rate:>11,.0f}{nbytes:>12,.0f}{ratio:>9.1f}")
    print(f"\nnpz: np.load of the whole file took {npz_load_s:.2f} s ({a.images / npz_load_s:,.0f} img/s), "
          f"and it must fit in RAM ({npz_bytes * a.images / 2**20:,.0f} MiB here)")
    print(f"build_lmdb: {build_rate:,.0f} img/s ({os.cpu_count()} decode processes)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
