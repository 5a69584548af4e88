"""OpenAI's CLIP checkpoint (TorchScript ViT-B-16.pt as distributed, or its plain state dict) -> our
image tower."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Tuple

import torch

from ..vit import VisionConfig
from .core import (ConversionReport, PathLike, StateDict, WeightConversionError, check_keys, image_tower_shapes,
                   is_torchscript, load_weights_file)
from .shapes import infer_vision_config, match_vision_config

# --------------------------------------------------------------------------------------------------
# OpenAI TorchScript -> image tower
# --------------------------------------------------------------------------------------------------

def convert_openai(path: PathLike) -> Tuple[StateDict, VisionConfig, ConversionReport]:
    """OpenAI CLIP checkpoint -> (`visual.*` + `logit_scale` [1], inferred VisionConfig, report).

    A TorchScript archive (OpenAI's own ViT-B-16.pt) is opened with torch.jit.load, which EXECUTES
    code stored in the file: only use files from a source you trust. A plain state dict with OpenAI's
    keys is loaded with weights_only=True instead."""
    path = Path(path)
    if not path.is_file():
        raise WeightConversionError(f"{path}: file not found")
    if is_torchscript(path):
        with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated; the format is what it is
            warnings.simplefilter("ignore", FutureWarning)
            archive = torch.jit.load(str(path), map_location="cpu")
        source = archive.state_dict()
        del archive
        kind = "OpenAI TorchScript"
    else:
        source = load_weights_file(path)
        kind = "OpenAI state dict"
    report = ConversionReport(f"{kind} {path}", "image tower (visual.*, logit_scale)")
    out: StateDict = {}
    for key, value in source.items():
        if key.startswith("visual."):
            out[key] = value.detach().clone()
        elif key == "logit_scale":
            out[key] = value.detach().reshape(1).clone()  # OpenAI's is 0-dim; ours is [1] for DeepSpeed
        elif key in ("input_resolution", "context_length", "vocab_size"):
            report.drop("scalar metadata", key)
        else:
            report.drop("text tower of OpenAI's CLIP, not used", key)
    if "logit_scale" not in out:
        raise WeightConversionError(f"{path}: no logit_scale; is this an OpenAI CLIP checkpoint?")
    cfg = infer_vision_config(out)
    check_keys(out, image_tower_shapes(cfg), f"{path} (visual)")
    report.mapped = len(out)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in out.values()})
    name = match_vision_config(cfg)
    report.notes.append(f"vision: {name or 'no named config matches'} ({cfg.to_dict()}); stored dtype {dtypes}")
    return out, cfg, report
