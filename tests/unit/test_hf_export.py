"""The transformers export of a trained model, checked by transformers itself: ChineseCLIPModel loads
with no missing keys and gives our features, the tokenizer gives our token ids, and the image processor
preprocesses as our store did (squash or centre crop). A vocabulary smaller than the config's works."""
import numpy as np
import pytest
import torch
from PIL import Image

from data.images.transform import normalize_uint8, preprocess_image
from data.tokenizer import tokenize
from engine.inference.model import load_model
from models import build_clip
from models.weights.model_file import make_record, save_model_file
from tests.dist.workers.extract_fixture import TEXT, VISION, build_tiny_split
from tests.unit.test_convert import hf_features, load_cli

transformers = pytest.importorskip("transformers")


def _model_file(root, resize):
    d = build_tiny_split(root, n_images=4, n_queries=3)
    model = build_clip(VISION, TEXT, vocab_size=d["vocab_size"])  # 36 tokens, the config says 128
    image = {"resolution": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
             "std": [0.26862954, 0.26130258, 0.27577711], "resize": resize}
    record = make_record(model.vision_config, model.text_config, d["vocab"], 16, image)
    save_model_file(torch.load(d["weights"], weights_only=True), record, root / "run" / "model_fp32.pt")
    return root / "run"


@pytest.mark.parametrize("resize,size", [("squash", (45, 30)), ("center-crop", (48, 32))])
def test_to_hf_from_the_model_file_alone(tmp_path, resize, size):
    from transformers import BertTokenizer, ChineseCLIPImageProcessor, ChineseCLIPModel

    run = _model_file(tmp_path, resize)
    assert load_cli().main(["to-hf", "--run", str(run), "--output", str(tmp_path / "hf")]) == 0
    hf, info = ChineseCLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.config.text_config.vocab_size == 36

    ours = load_model(run=str(run))
    texts = ["红色的连衣裙", "一只猫"]
    ids = tokenize(ours.tokenizer, texts, ours.context_length)
    hf_tok = BertTokenizer.from_pretrained(tmp_path / "hf")
    hf_ids = hf_tok(texts, max_length=16, truncation=True, padding="max_length", return_tensors="pt")["input_ids"]
    assert torch.equal(ids, hf_ids)

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    proc = ChineseCLIPImageProcessor.from_pretrained(tmp_path / "hf")
    hf_pixels = proc(images=img, return_tensors="pt")["pixel_values"]
    our_pixels = normalize_uint8(torch.from_numpy(preprocess_image(img, 32, resize=resize))[None])
    # transformers rounds its bicubic result its own way: at most one intensity level apart, on few pixels.
    one_level = 1 / (255 * 0.26130258) + 1e-4
    diff = (hf_pixels - our_pixels).abs()
    assert diff.max() <= one_level and (diff > 1e-4).float().mean() < 0.02, (diff.max(), (diff > 1e-4).sum())
    other = "center-crop" if resize == "squash" else "squash"
    assert not torch.allclose(hf_pixels, normalize_uint8(torch.from_numpy(preprocess_image(img, 32, other))[None]),
                              atol=1e-2)

    # The exported folder is itself a complete model for our tools (configs and tokenizer from it).
    again = load_model(str(tmp_path / "hf"))
    assert torch.equal(tokenize(again.tokenizer, texts, 16), ids)

    hf.eval()
    want_img, want_txt = hf_features(hf, our_pixels, ids)
    with torch.no_grad():
        torch.testing.assert_close(ours.model.encode_image(our_pixels), want_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.model.encode_text(ids), want_txt, atol=1e-5, rtol=0)
        torch.testing.assert_close(again.model.encode_image(our_pixels), want_img, atol=1e-5, rtol=0)


def test_to_hf_plain_state_dict_with_a_small_vocab(tmp_path):
    # Before: the text config's 128-token vocabulary was used and word_embeddings did not fit.
    from transformers import ChineseCLIPModel

    d = build_tiny_split(tmp_path, n_images=2, n_queries=1)
    assert load_cli().main(["to-hf", "--input", str(d["weights"]), "--output", str(tmp_path / "hf"),
                            "--vision", VISION, "--text", TEXT, "--vocab", str(d["vocab"])]) == 0
    hf, info = ChineseCLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and hf.config.text_config.vocab_size == d["vocab_size"]
