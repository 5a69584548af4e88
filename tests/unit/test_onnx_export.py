"""ONNX export: the library that owns the format (onnxruntime) computes the same features as
PyTorch, at two batch sizes of one exported file (dynamic batch); a clear error without onnx."""
import json
import sys

import numpy as np
import pytest
import torch

from launch.export_onnx import main as export_main
from models import build_clip
from tests.unit.tiny_inputs import images, perturb_, token_batch

ort = pytest.importorskip("onnxruntime", reason="optional: pip install -r tests/requirements-optional.txt")
onnx = pytest.importorskip("onnx", reason="optional: pip install -r tests/requirements-optional.txt")

CTX = 12


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = perturb_(build_clip("ViT-tiny-test", "BERT-tiny-test")).eval()
    torch.save(model.state_dict(), root / "model_fp32.pt")
    code = export_main(["--model", "ViT-tiny-test", "--text-model", "BERT-tiny-test", "--weights",
                        str(root / "model_fp32.pt"), "--context-length", str(CTX), "--output", str(root / "out")])
    assert code == 0
    return model, root / "out"


@pytest.mark.parametrize("batch", [1, 6])
def test_onnxruntime_features_equal_pytorch(exported, batch):
    model, out = exported
    img = ort.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    txt = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    pixels = images(n=batch, r=32, seed=10 + batch)
    lengths = [(3 + 4 * i) % (CTX - 1) + 2 for i in range(batch)]  # padded rows of different lengths
    ids = token_batch(vocab=128, lengths=lengths, total=CTX, seed=batch)
    with torch.no_grad():
        want_img, want_txt = model.encode_image(pixels).numpy(), model.encode_text(ids).numpy()
    got_img = img.run(["features"], {"pixels": pixels.numpy()})[0]
    got_txt = txt.run(["features"], {"input_ids": ids.numpy()})[0]
    assert got_img.shape == (batch, 24) and got_txt.shape == (batch, 24)
    np.testing.assert_allclose(got_img, want_img, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_txt, want_txt, atol=1e-4, rtol=0)
    assert np.abs(want_txt[0] - want_txt[-1]).max() > 1e-2 or batch == 1  # rows differ: not a constant


def test_exported_graphs_have_a_dynamic_batch_axis_and_a_description(exported):
    _, out = exported
    for name, inp in (("image_encoder.onnx", "pixels"), ("text_encoder.onnx", "input_ids")):
        graph = onnx.load(str(out / name)).graph
        assert [i.name for i in graph.input] == [inp]
        dims = graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and not dims[0].dim_value
    info = json.loads((out / "onnx_export.json").read_text())
    assert info["context_length"] == CTX and info["model"] == "ViT-tiny-test" and info["embed_dim"] == 24


def test_missing_optional_package_names_the_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    code = export_main(["--model", "ViT-tiny-test", "--text-model", "BERT-tiny-test", "--weights",
                        str(tmp_path / "absent.pt"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "onnxruntime" in err and "pip install -r tests/requirements-optional.txt" in err
    assert not (tmp_path / "out").exists()
