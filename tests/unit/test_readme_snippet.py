"""The README's "Using a trained model from Python" block, run as written on a tiny model file (only
the run directory and the photo path are swapped for the test's), against the same computation done
by hand from the plain weights and explicit configs."""
import contextlib
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from data.images.transform import normalize_uint8, preprocess_image
from data.tokenizer import load_tokenizer, tokenize
from models import build_clip
from tests.dist.workers.extract_fixture import TEXT, VISION, build_tiny_split, save_tiny_model_file
from tests.ranks import REPO


def readme_block():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Using a trained model from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_encodes_a_query_and_an_image(tmp_path):
    d = build_tiny_split(tmp_path, n_images=2, n_queries=1)
    image = {"resolution": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "resize": "squash"}
    state = save_tiny_model_file(d, tmp_path / "run" / "model_fp32.pt", 20, image)
    model = build_clip(VISION, TEXT, vocab_size=d["vocab_size"])
    photo = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)).save(photo)

    code = readme_block()
    assert "logs/muge_vitb16" in code and "photo.jpg" in code
    code = code.replace('"logs/muge_vitb16"', repr(str(tmp_path / "run"))).replace('"photo.jpg"', repr(str(photo)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md snippet", "exec"), {})
    got = float(out.getvalue().strip())

    # By hand: plain weights, explicit configs, the vocab file, the recorded preprocessing.
    model.load_state_dict(state)
    model.eval()
    ids = tokenize(load_tokenizer(d["vocab"]), ["圣诞 抱枕"], 20)
    pixels = torch.from_numpy(preprocess_image(Image.open(photo), 32, resize="squash"))[None]
    with torch.no_grad():
        want = float(model.encode_text(ids) @ model.encode_image(normalize_uint8(pixels, image["mean"], image["std"])).T)
    assert got == pytest.approx(want, abs=1e-5) and -1 <= got <= 1
