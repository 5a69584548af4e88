"""Image decoding, the evaluation transform (squash or centre crop), and normalisation of uint8 batches.

Images are transformed once, at build time, into uint8 C×H×W; normalisation to float happens at
load time (ideally on the device), never on disk: uint8 is 4× smaller than float32 and needs no
decoding, and the mean/std stay a property of the model, not of the stored data.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from data.files import InputError

# OpenAI CLIP's pixel statistics, which Chinese-CLIP also uses.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageDecodeError(InputError):
    """Bytes that are not a decodable image (garbage, a truncated JPEG, an unknown format)."""


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (so a truncated file fails here, not later) and return RGB."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise ImageDecodeError(f"not a decodable image ({type(e).__name__}: {e})") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("P", "PA") or "A" in img.getbands():
        # Palette images with transparency convert cleanly only through RGBA.
        img = img.convert("RGBA")
    return img.convert("RGB")


RESIZE_MODES = ("squash", "center-crop")
# A store whose manifest has no "resize" key was built before the mode existed: centre-cropped.
LEGACY_RESIZE = "center-crop"


def check_resize(resize: str) -> str:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, not {resize!r}")
    return resize


def preprocess_image(img: Image.Image, resolution: int, resize: str = "squash") -> np.ndarray:
    """The evaluation transform on a PIL image -> contiguous uint8 [3, R, R], RGB, bicubic.

    resize="squash" (Chinese-CLIP's, in training and evaluation): resize to R×R, ignoring the aspect
    ratio. resize="center-crop" (OpenAI CLIP's): resize the shorter side to R (the longer side is
    truncated as torchvision's Resize does), then centre crop R×R. Weights see what they were trained
    on only with their own mode: on a 3:2 image the two give features at cosine ~0.8."""
    check_resize(resize)
    img = to_rgb(img)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError("image has zero size")
    if resize == "squash":
        if (w, h) != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.BICUBIC)
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if w <= h else (new_long, resolution)
    if size != (w, h):
        img = img.resize(size, Image.BICUBIC)
    w, h = img.size
    # Same rounding as torchvision's center_crop.
    top = int(round((h - resolution) / 2.0))
    left = int(round((w - resolution) / 2.0))
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.uint8)  # [R, R, 3]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_and_preprocess(data: bytes, resolution: int, resize: str = "squash") -> np.ndarray:
    """Bytes of an image file -> uint8 [3, R, R]."""
    return preprocess_image(decode_image(data), resolution, resize=resize)


def normalize_uint8(batch, mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD,
                    dtype=None):
    """uint8 [B, 3, H, W] (a torch tensor on any device) -> (x/255 - mean)/std in `dtype`.

    The arithmetic runs in float32 and is cast at the end, so a bf16/fp16 result is the rounded
    float32 value rather than an accumulation of low-precision steps."""
    import torch

    if dtype is None:
        dtype = torch.float32
    if batch.dtype != torch.uint8:
        raise TypeError(f"normalize_uint8 expects a uint8 tensor, got {batch.dtype}")
    if batch.dim() != 4 or batch.shape[1] != len(mean):
        raise ValueError(f"expected [B, {len(mean)}, H, W], got {list(batch.shape)}")
    m = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    # (x/255 - m)/s == x * (1/(255 s)) - m/s: one multiply-add over the batch.
    x = torch.addcmul(-m / s, batch.to(torch.float32), 1.0 / (255.0 * s))
    return x.to(dtype)
