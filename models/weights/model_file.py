"""Self-describing model files: the weights plus what is needed to use them.

A model file (`model_fp32.pt`, written by the trainer's --export) is a torch.save'd dict of plain
dicts, strings, numbers and tensors, so torch.load(weights_only=True) reads it:

    {"format": "clip-model-v1",
     "weights": {our state dict: visual.*, bert.*, text_projection, logit_scale},
     "record":  {"vision": VisionConfig fields,
                 "text": BertConfig fields (vocab_size = the tokenizer's),
                 "context_length": int,
                 "vocab": {"text": the vocab.txt content, "path": where it was read, "sha256": of the text},
                 "image": {"resolution", "mean", "std", "resize"}}}

A plain state dict (an older model_fp32.pt, or a converted file) still loads everywhere; the tools
then need --model/--text-model/--vocab as before. How the tools name a model file, and check flags
against its record: engine/inference/naming.py and source.py. shapes.describe_state reads an architecture from
the weights' shapes, so a mismatch is reported as one line naming what the weights are.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from data.files import InputError, atomic_path
from data.tokenizer import vocab_file

from ..config import load_vision_config
from ..text import config_to_json_dict, make_bert_config
from ..vit import VisionConfig
from .core import load_weights_file

FORMAT = "clip-model-v1"
PathLike = Union[str, os.PathLike]
Record = Dict[str, Any]


def vocab_sha256(path: PathLike) -> str:
    return hashlib.sha256(vocab_file(path).read_bytes()).hexdigest()


def make_record(vision: VisionConfig, text, vocab: PathLike, context_length: int,
                image: Mapping[str, Any]) -> Record:
    """The record of a model: configs (text with the tokenizer's vocab size), the vocab itself,
    context length and the image preprocessing its training data had (an ImageStore's)."""
    vfile = vocab_file(vocab)
    content = vfile.read_bytes()
    return {"vision": vision.to_dict(), "text": config_to_json_dict(text), "context_length": int(context_length),
            "vocab": {"text": content.decode("utf-8"), "path": str(vfile.resolve()),
                      "sha256": hashlib.sha256(content).hexdigest()},
            "image": {"resolution": int(image["resolution"]), "mean": [float(x) for x in image["mean"]],
                      "std": [float(x) for x in image["std"]], "resize": str(image["resize"])}}


def save_model_file(state: Mapping[str, torch.Tensor], record: Optional[Record], path: PathLike) -> None:
    """Atomic torch.save: the self-describing dict, or a plain state dict when `record` is None."""
    weights = {k: v.detach().contiguous() for k, v in state.items()}
    obj = weights if record is None else {"format": FORMAT, "weights": weights, "record": record}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def is_model_file(obj: Mapping) -> bool:
    return obj.get("format") == FORMAT and isinstance(obj.get("weights"), Mapping)


def unwrap(obj: Mapping, path: PathLike) -> Tuple[Dict[str, torch.Tensor], Optional[Record]]:
    """(state dict, record) of a loaded model file; (obj, None) for anything else."""
    if not is_model_file(obj):
        return dict(obj), None
    record = obj.get("record")
    if not isinstance(record, Mapping) or not {"vision", "text", "vocab"} <= set(record):
        raise InputError(f"{path}: a {FORMAT} file without a complete record")
    return dict(obj["weights"]), dict(record)


def read_model_file(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Optional[Record]]:
    """torch.load(weights_only=True) a model file -> (state dict, record or None for a plain one)."""
    return unwrap(load_weights_file(path), path)


def configs(record: Record, source: str = "model record"):
    """(VisionConfig, BertConfig) of a record."""
    return (load_vision_config(VisionConfig(**record["vision"])),
            make_bert_config(record["text"], source=source, strict=False))
