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
then need --model/--text-model/--vocab as before. shapes.describe_state reads an architecture from
the weights' shapes, so a mismatch is reported as one line naming what the weights are.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from data.files import InputError, atomic_path
from data.tokenizer import vocab_file

from ..config import load_text_config, load_vision_config
from ..text import ARCH_FIELDS, config_to_json_dict, make_bert_config
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


def read_record(path: PathLike) -> Optional[Record]:
    """The record of a model file; None for a plain state dict, a folder or another format."""
    if Path(path).is_dir():
        return None
    return read_model_file(path)[1]


def resolve_weights(weights: Optional[str], run: Optional[str]) -> Optional[Path]:
    """--weights FILE or --run RUN_DIR (its model_fp32.pt); both given is an error."""
    if weights and run:
        raise InputError("give --weights or --run, not both")
    if run:
        path = Path(run) / "model_fp32.pt"
        if not path.is_file():
            raise InputError(f"--run {run}: no model_fp32.pt there (train with --export to write it)")
        return path
    return Path(weights) if weights else None


def configs(record: Record, source: str = "model record"):
    """(VisionConfig, BertConfig) of a record."""
    return (load_vision_config(VisionConfig(**record["vision"])),
            make_bert_config(record["text"], source=source, strict=False))


def write_vocab(record: Record, folder: PathLike) -> Path:
    """Write the record's vocab to <folder>/vocab.txt (for a tokenizer) and return the path."""
    path = Path(folder) / "vocab.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(record["vocab"]["text"].encode("utf-8"))
    return path


def check_flags(record: Record, path: PathLike, model: Optional[str] = None, text_model: Optional[str] = None,
                vocab: Optional[str] = None, context_length: Optional[int] = None) -> None:
    """Flags given explicitly must agree with the file's record; a conflict names both."""
    vision, text = configs(record)
    if model and load_vision_config(model) != vision:
        raise InputError(f"--model {model} ({load_vision_config(model).to_dict()}) conflicts with {path}, whose "
                         f"record says {vision.to_dict()}; drop --model to use the file's")
    if text_model:
        want = load_text_config(text_model, vocab_size=text.vocab_size)
        diff = [k for k in ARCH_FIELDS if k != "vocab_size" and getattr(want, k) != getattr(text, k)]
        if diff:
            raise InputError(f"--text-model {text_model} conflicts with {path}: " + ", ".join(
                f"{k} {getattr(want, k)} vs {getattr(text, k)} recorded" for k in diff) + "; drop --text-model")
    if vocab and vocab_sha256(vocab) != record["vocab"]["sha256"]:
        raise InputError(f"--vocab {vocab} is not the vocabulary {path} was trained with "
                         f"({record['vocab']['path']}, sha256 {record['vocab']['sha256'][:12]}...); drop --vocab "
                         f"to use the one the file carries")
    if context_length is not None and context_length != record.get("context_length", context_length):
        raise InputError(f"--context-length {context_length} conflicts with {path}, trained with "
                         f"{record['context_length']}; drop --context-length to use the file's")
