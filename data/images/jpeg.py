"""JPEG bytes <-> the uint8 [3, R, R] images of our stores (launch/build_dataset.py --format jpeg).

The image is transformed first (data.images.transform, as for a uint8 store) and the R×R result is encoded, so
decoding gives back the training input directly, within JPEG's error; nothing is resized at load time.
CPU decoding runs in threads (libjpeg releases the GIL); the GPU path (torchvision's nvjpeg decoder)
lives in engine/loader/jpeg_gpu.py because only the engine knows devices.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

DEFAULT_QUALITY = 95
_POOL: Optional[ThreadPoolExecutor] = None
_POOL_PID: Optional[int] = None


def encode_jpeg(image: np.ndarray, quality: int = DEFAULT_QUALITY) -> bytes:
    """uint8 [3, R, R] -> baseline JPEG bytes (Pillow's default 4:2:0 chroma subsampling)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected uint8 [3, R, R], got {image.dtype} {list(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(buf, format="JPEG",
                                                                         quality=int(quality))
    return buf.getvalue()


def _threads() -> ThreadPoolExecutor:
    """One pool per process (a pool must not cross a fork into DataLoader workers)."""
    global _POOL, _POOL_PID
    if _POOL is None or _POOL_PID != os.getpid():
        n = int(os.environ.get("CLIP_JPEG_THREADS", "0")) or min(8, os.cpu_count() or 1)
        _POOL, _POOL_PID = ThreadPoolExecutor(max_workers=n, thread_name_prefix="jpeg"), os.getpid()
    return _POOL


def _decode_into(data: bytes, out: np.ndarray) -> None:
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img)
    if arr.shape != (out.shape[1], out.shape[2], 3):
        raise ValueError(f"a stored JPEG decodes to {arr.shape[1]}x{arr.shape[0]}, expected "
                         f"{out.shape[2]}x{out.shape[1]}")
    out[...] = arr.transpose(2, 0, 1)


def decode_jpegs(blobs: Sequence[bytes], shape: Tuple[int, int, int],
                 out: Optional[np.ndarray] = None) -> np.ndarray:
    """JPEG bytes -> uint8 [B, 3, R, R], decoded in a thread pool straight into `out`."""
    if out is None:
        out = np.empty((len(blobs),) + tuple(shape), dtype=np.uint8)
    if len(blobs) <= 2:
        for i, b in enumerate(blobs):
            _decode_into(b, out[i])
        return out
    list(_threads().map(_decode_into, blobs, [out[i] for i in range(len(blobs))]))
    return out
