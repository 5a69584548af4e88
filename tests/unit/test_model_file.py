"""Self-describing model files: what they record, extract.py from the file alone, conflicts with flags,
one-line architecture errors, the context-length check before any work, and images-only with --vocab."""
import types

import numpy as np
import pytest
import torch

from data.files import InputError
from data.images.store import ImageStore
from engine.inference.model import load_model
from launch.extract import main as extract_main
from models import build_clip
from models.weights.model_file import FORMAT, vocab_sha256
from tests.dist.workers.extract_fixture import TEXT, VISION, build_tiny_split, save_tiny_model_file


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    d = build_tiny_split(root)
    store = ImageStore(d["lmdb"])
    image = {"resolution": store.resolution, "mean": store.mean, "std": store.std, "resize": store.resize}
    store.close()
    state = save_tiny_model_file(d, root / "run" / "model_fp32.pt", 24, image)
    d.update(root=root, model_file=root / "run" / "model_fp32.pt", run=root / "run", state=state)
    return d


def _feats(folder, kind):
    data = np.load(next((folder / f"{kind}_feats").glob("*.npz")))
    return data["ids"], data["feats"]


def test_model_file_loads_with_weights_only_and_records_everything(split):
    obj = torch.load(split["model_file"], weights_only=True)
    assert obj["format"] == FORMAT
    assert obj["weights"].keys() == split["state"].keys()
    rec = obj["record"]
    assert rec["text"]["vocab_size"] == split["vocab_size"] == rec["text"]["vocab_size"]
    assert rec["vision"]["image_resolution"] == 32 and rec["context_length"] == 24
    assert rec["vocab"]["text"] == split["vocab"].read_text(encoding="utf-8")
    assert rec["vocab"]["sha256"] == vocab_sha256(split["vocab"])
    assert rec["image"]["resize"] == "squash" and len(rec["image"]["mean"]) == 3


def test_extract_from_the_model_file_alone_matches_explicit_flags(split, tmp_path):
    common = ["--image-lmdb", str(split["lmdb"]), "--queries", str(split["queries"]), "--no-progress"]
    assert extract_main(["--run", str(split["run"]), "--output", str(tmp_path / "a")] + common) == 0
    # The oracle: the old way, a plain state dict and every flag spelled out.
    assert extract_main(["--weights", str(split["weights"]), "--model", VISION, "--text-model", TEXT,
                         "--vocab", str(split["vocab"]), "--context-length", "24",
                         "--output", str(tmp_path / "b")] + common) == 0
    for kind in ("image", "text"):
        ids_a, fa = _feats(tmp_path / "a", kind)
        ids_b, fb = _feats(tmp_path / "b", kind)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_allclose(fa, fb, atol=1e-6)
    # Flags that agree with the record are accepted.
    assert extract_main(["--weights", str(split["model_file"]), "--model", VISION, "--vocab", str(split["vocab"]),
                         "--output", str(tmp_path / "c")] + common) == 0


@pytest.mark.parametrize("flag,value,words", [
    ("--model", "ViT-demo-64", ["--model ViT-demo-64", "model_fp32.pt"]),
    ("--text-model", "BERT-demo", ["--text-model BERT-demo", "model_fp32.pt"]),
    ("--context-length", "30", ["--context-length 30", "trained with 24"]),
    ("--vocab", "OTHER", ["--vocab", "not the vocabulary", "model_fp32.pt"]),
])
def test_a_flag_conflicting_with_the_record_is_an_error_naming_both(split, tmp_path, capsys, flag, value, words):
    if value == "OTHER":
        other = tmp_path / "vocab.txt"
        other.write_text(split["vocab"].read_text(encoding="utf-8") + "额外\n", encoding="utf-8")
        value = str(other)
    code = extract_main(["--run", str(split["run"]), flag, value, "--image-lmdb", str(split["lmdb"]),
                         "--output", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


def test_wrong_architecture_is_one_line_naming_the_weights(split, tmp_path, capsys):
    code = extract_main(["--weights", str(split["weights"]), "--model", "ViT-demo-64", "--text-model", "BERT-demo",
                         "--vocab", str(split["vocab"]), "--image-lmdb", str(split["lmdb"]),
                         "--output", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "\n" not in err and len(err) < 600, err
    assert f"the weights are vision {VISION} (width" in err and f"text {TEXT}" in err
    assert "the model is vision ViT-demo-64" in err


def test_images_only_with_vocab_sizes_the_text_tower_from_it(split, tmp_path):
    # issue 10: the vocab was read only with --queries, so the text tower kept the config's vocab size.
    assert extract_main(["--weights", str(split["weights"]), "--model", VISION, "--text-model", TEXT,
                         "--vocab", str(split["vocab"]), "--image-lmdb", str(split["lmdb"]),
                         "--output", str(tmp_path / "o"), "--no-progress"]) == 0
    ids, feats = _feats(tmp_path / "o", "image")
    assert len(ids) == 45 and feats.shape[1] == build_clip(VISION, TEXT).embed_dim


def test_context_length_is_checked_before_any_work(split, tmp_path, capsys):
    max_pos = build_clip(VISION, TEXT).text_config.max_position_embeddings
    code = extract_main(["--weights", str(split["weights"]), "--model", VISION, "--text-model", TEXT,
                         "--vocab", str(split["vocab"]), "--context-length", str(max_pos + 1),
                         "--image-lmdb", str(split["lmdb"]), "--queries", str(split["queries"]),
                         "--output", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert f"context length {max_pos + 1} exceeds the text model's max_position_embeddings {max_pos}" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # no image features written first


def test_plain_state_dict_images_only_without_vocab_takes_the_vocab_size_from_the_weights(split):
    m = load_model(str(split["weights"]), model=VISION, text_model=TEXT)
    assert m.tokenizer is None and m.model.text_config.vocab_size == split["vocab_size"]
    assert m.resize is None  # a plain state dict records no preprocessing


def test_init_from_wrong_shapes_gets_no_vocab_hint(split, tmp_path):
    # issue 10: the trainer added its "--vocab has N tokens" note to any conversion error.
    from engine.train.trainer import Trainer

    note = "VOCAB-NOTE"
    cfg = types.SimpleNamespace(init_from=str(split["weights"]), clip_weight_path=None, bert_weight_path=None)
    store = types.SimpleNamespace(resize="squash", path=split["lmdb"])
    fake = types.SimpleNamespace(cfg=cfg, _vocab_note=note, store=store)
    with pytest.raises(InputError) as e:  # another architecture: no vocabulary hint
        Trainer._load_weights(fake, build_clip("ViT-demo-64", TEXT, vocab_size=split["vocab_size"]))
    assert note not in str(e.value) and "the weights are vision" in str(e.value)
    with pytest.raises(InputError) as e:  # only the vocabulary differs: the hint is the cause
        Trainer._load_weights(fake, build_clip(VISION, TEXT, vocab_size=split["vocab_size"] + 5))
    assert note in str(e.value) and "text vocabulary has 36 tokens, the model's 41" in str(e.value)
    Trainer._load_weights(fake, build_clip(VISION, TEXT, vocab_size=split["vocab_size"]))  # fits: loads


def test_init_from_chinese_clip_warns_on_a_center_crop_store(split, tmp_path):
    from engine.run.export import warn_preprocessing
    from models.weights import save_checkpoint_dict, to_chinese_clip

    ckpt = tmp_path / "cn.pt"
    save_checkpoint_dict(to_chinese_clip(split["state"], name="x"), ckpt)
    crop = types.SimpleNamespace(resize="center-crop", path="STORE")
    msg = warn_preprocessing(str(ckpt), crop)
    assert msg and "squash" in msg and "--resize squash" in msg and "STORE" in msg
    assert warn_preprocessing(str(ckpt), types.SimpleNamespace(resize="squash", path="S")) is None
    assert warn_preprocessing(str(split["model_file"]), crop) is not None  # the record says squash
    assert warn_preprocessing(str(split["weights"]), crop) is None  # a plain state dict says nothing
