"""ONNX export of the two encoders, and a check of the export against PyTorch in onnxruntime.

image_encoder.onnx: "pixels" float32 [batch, 3, R, R] (normalised with the image mean/std, as
the LMDB pipeline feeds the model) -> "features" float32 [batch, D], L2-normalised.
text_encoder.onnx: "input_ids" int64 [batch, context_length] ([CLS] ... [SEP], 0-padded; the
attention mask is input_ids != 0, computed inside) -> "features" float32 [batch, D], L2-normalised.
The batch axis is dynamic. onnx and onnxruntime are optional dependencies (training never needs
them): tests/requirements-optional.txt pins them.

We use torch's TorchScript-based exporter (dynamo=False): with torch 2.14 the dynamo exporter
needs onnxscript as well and, asked for opset 17, failed its version conversion on our graphs.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from data.files import InputError, atomic_path, atomic_write

OPSET = 17
PIP_HINT = "pip install -r tests/requirements-optional.txt (onnx and onnxruntime, pinned)"


def require(*modules: str) -> None:
    """InputError naming the pip command when an optional package is missing."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise InputError(f"ONNX export needs the optional package(s) {', '.join(missing)}: {PIP_HINT}")


class ImageEncoder(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels)


class TextEncoder(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(input_ids)


def example_inputs(model, context_length: int, batch: int = 2, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random pixels and token ids (padding at the end of some rows), for tracing and checks."""
    g = torch.Generator().manual_seed(seed)
    r = model.image_resolution
    pixels = torch.randn(batch, 3, r, r, generator=g)
    vocab = model.text_config.vocab_size
    ids = torch.randint(1, vocab, (batch, context_length), generator=g)
    for i in range(batch):  # rows of different lengths, like real captions
        ids[i, max(2, context_length - 1 - (i * 3) % context_length):] = 0
    return {"pixels": pixels, "input_ids": ids}


def export(model, out_dir, context_length: int, describe: Dict) -> List[Path]:
    """Write image_encoder.onnx, text_encoder.onnx and onnx_export.json (what the files expect)
    atomically under out_dir; returns their paths."""
    require("onnx")
    import onnx

    if context_length > model.text_config.max_position_embeddings:
        raise InputError(f"--context-length {context_length} exceeds the text model's "
                         f"{model.text_config.max_position_embeddings} positions")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    x = example_inputs(model, context_length)
    written = []
    for name, wrapper, inp in (("image_encoder.onnx", ImageEncoder(model), "pixels"),
                               ("text_encoder.onnx", TextEncoder(model), "input_ids")):
        with atomic_path(out_dir / name) as tmp, torch.no_grad(), warnings.catch_warnings():
            # Known and harmless here: transformers' "is_causal" test is traced as a constant (we
            # always pass a mask, so it is False), and aten::index warns about negative indices
            # (ours are position ids, never negative). The test compares the features.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            torch.onnx.export(wrapper, (x[inp],), str(tmp), input_names=[inp], output_names=["features"],
                              dynamic_axes={inp: {0: "batch"}, "features": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
            onnx.checker.check_model(str(tmp))
        written.append(out_dir / name)
    info = {**describe, "context_length": context_length, "image_resolution": model.image_resolution,
            "embed_dim": model.embed_dim, "opset": OPSET,
            "image_encoder": {"input": "pixels float32 [batch, 3, R, R], normalised with the image mean/std",
                              "output": "features float32 [batch, embed_dim], L2-normalised"},
            "text_encoder": {"input": "input_ids int64 [batch, context_length], [CLS] .. [SEP] then 0",
                             "output": "features float32 [batch, embed_dim], L2-normalised"}}
    with atomic_write(out_dir / "onnx_export.json") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    return written + [out_dir / "onnx_export.json"]


def session(path, threads: int = 0):
    """An onnxruntime CPU session (threads 0: onnxruntime's default)."""
    require("onnxruntime")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def max_differences(model, out_dir, context_length: int, batches: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Largest |onnxruntime - PyTorch| feature difference per encoder and batch size."""
    out_dir = Path(out_dir)
    model = model.float().eval()
    sess = {"pixels": session(out_dir / "image_encoder.onnx"), "input_ids": session(out_dir / "text_encoder.onnx")}
    result = {}
    for b in batches:
        x = example_inputs(model, context_length, batch=b, seed=100 + b)
        ref = {"pixels": model.encode_image(x["pixels"]), "input_ids": model.encode_text(x["input_ids"])}
        for inp, s in sess.items():
            got = s.run(None, {inp: x[inp].numpy()})[0]
            result[f"{'image' if inp == 'pixels' else 'text'}@{b}"] = float(np.abs(got - ref[inp].numpy()).max())
    return result
