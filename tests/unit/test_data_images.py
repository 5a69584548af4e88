"""CLIP's evaluation transform, decoding errors and normalisation, against independent oracles."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from data.images.transform import (IMAGE_MEAN, IMAGE_STD, ImageDecodeError, decode_image, normalize_uint8,
                                   preprocess_image)
from data.files import InputError


def _random_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


@pytest.mark.parametrize("w,h", [(100, 60), (60, 100), (57, 57), (31, 90), (224, 225)])
def test_preprocess_matches_torchvision_clip_transform(w, h):
    tv = pytest.importorskip("torchvision.transforms")
    img = _random_image(w, h, seed=w * h)
    oracle = tv.Compose([tv.Resize(32, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(32),
                         tv.PILToTensor()])(img).numpy()
    ours = preprocess_image(img, 32, resize="center-crop")
    assert ours.dtype == np.uint8 and ours.shape == (3, 32, 32) and ours.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(ours, oracle)


@pytest.mark.parametrize("w,h", [(100, 60), (60, 100), (57, 57), (31, 90), (32, 32)])
def test_squash_matches_chinese_clip_transform(w, h):
    # Chinese-CLIP's transform: Resize((R, R), BICUBIC) on the PIL image, no crop (the default mode).
    tv = pytest.importorskip("torchvision.transforms")
    img = _random_image(w, h, seed=w + h)
    oracle = tv.Compose([tv.Resize((32, 32), interpolation=tv.InterpolationMode.BICUBIC),
                         tv.PILToTensor()])(img).numpy()
    ours = preprocess_image(img, 32)
    assert ours.shape == (3, 32, 32) and ours.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(ours, oracle)
    if w != h:  # the two modes really differ on a non-square image
        assert not np.array_equal(ours, preprocess_image(img, 32, resize="center-crop"))
    with pytest.raises(ValueError, match="resize"):
        preprocess_image(img, 32, resize="crop")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_become_rgb(mode):
    img = _random_image(40, 40, mode=mode)
    out = preprocess_image(img, 40)
    expect = np.asarray(img.convert("RGBA").convert("RGB") if mode in ("RGBA", "P") else img.convert("RGB"))
    np.testing.assert_array_equal(out, expect.transpose(2, 0, 1))


def _jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_decode_jpeg_and_png():
    img = _random_image(20, 10)
    png = io.BytesIO()
    img.save(png, format="PNG")
    np.testing.assert_array_equal(np.asarray(decode_image(png.getvalue())), np.asarray(img))
    assert decode_image(_jpeg_bytes(img)).size == (20, 10)


@pytest.mark.parametrize("data", [b"", b"hello, not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 20])
def test_decode_non_image_raises(data):
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data)
    assert isinstance(e.value, InputError)


def test_decode_truncated_jpeg_raises():
    data = _jpeg_bytes(_random_image(64, 64), quality=95)
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_uint8_formula(dtype):
    x = torch.randint(0, 256, (3, 3, 5, 4), dtype=torch.uint8)
    got = normalize_uint8(x, IMAGE_MEAN, IMAGE_STD, dtype=dtype)
    assert got.dtype == dtype and got.shape == x.shape
    oracle = np.empty(x.shape, dtype=np.float64)
    for c in range(3):
        oracle[:, c] = (x[:, c].numpy() / 255.0 - IMAGE_MEAN[c]) / IMAGE_STD[c]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(got.float().numpy(), oracle, atol=tol, rtol=tol)


def test_normalize_rejects_float_input():
    with pytest.raises(TypeError):
        normalize_uint8(torch.zeros(1, 3, 2, 2))
