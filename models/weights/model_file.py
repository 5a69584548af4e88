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
then need --model/--text-model/--vocab as before. `describe_state` reads an architecture from the
weights' shapes, so a mismatch is reported as one line naming what the weights are.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from data.files import InputError, atomic_path

from .config import list_model_configs, load_text_config, load_vision_config
from .text import ARCH_FIELDS, config_to_json_dict, make_bert_config
from .vit import VisionConfig

FORMAT = "clip-model-v1"
PathLike = Union[str, os.PathLike]
Record = Dict[str, Any]


def vocab_file(path: PathLike) -> Path:
    """The vocab.txt of a tokenizer folder, or the file itself."""
    path = Path(path)
    return path / "vocab.txt" if path.is_dir() else path


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
    from .convert import load_weights_file

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


# --- architecture from shapes ---------------------------------------------------------------------

def text_shape(state: Mapping[str, torch.Tensor]) -> Optional[Dict[str, int]]:
    """hidden size, layers, intermediate size, positions and vocab size of `bert.*` weights."""
    emb = state.get("bert.embeddings.word_embeddings.weight")
    if emb is None:
        return None
    layers = {int(m.group(1)) for k in state if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k))}
    inter = state.get("bert.encoder.layer.0.intermediate.dense.weight")
    pos = state.get("bert.embeddings.position_embeddings.weight")
    return {"hidden_size": int(emb.shape[1]), "num_hidden_layers": len(layers), "vocab_size": int(emb.shape[0]),
            "intermediate_size": int(inter.shape[0]) if inter is not None else 0,
            "max_position_embeddings": int(pos.shape[0]) if pos is not None else 0}


def _named_text(shape: Dict[str, int]) -> Optional[str]:
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings")
    for name in list_model_configs()["text"]:
        cfg = load_text_config(name)
        if all(getattr(cfg, k) == shape[k] for k in keys):
            return name
    return None


def describe_state(state: Mapping[str, torch.Tensor]) -> str:
    """One phrase naming the architecture the weights have, read from their shapes."""
    from .convert import WeightConversionError, infer_vision_config, match_vision_config

    parts = []
    try:
        v = infer_vision_config(state)
        name = match_vision_config(v)
        parts.append(f"vision {name or 'unnamed'} (width {v.vision_width}, {v.vision_layers} layers, patch "
                     f"{v.vision_patch_size}, {v.image_resolution} px, embed {v.embed_dim})")
    except WeightConversionError:
        parts.append("no ViT in OpenAI's layout")
    t = text_shape(state)
    if t is None:
        parts.append("no text tower")
    else:
        parts.append(f"text {_named_text(t) or 'unnamed'} (hidden {t['hidden_size']}, {t['num_hidden_layers']} "
                     f"layers, vocab {t['vocab_size']})")
    return " + ".join(parts)
