"""One way to name a model, for every tool that reads one: extract, zeroshot, export_onnx, the
gallery's --run, convert_weights' to-hf / to-chinese-clip / from-hf / from-chinese-clip, and
train's --init-from. naming.py says which path the flags name; this module what is there.

A model is named by its weights alone (a file, or a ChineseCLIPModel folder) or by the run that
wrote it (--run DIR; a path that is a run dir means its model_fp32.pt too). What the model is comes
from the source when it says so: our model file's record (configs, vocabulary, context length,
image preprocessing), or a ChineseCLIPModel folder's config.json, vocab.txt and
preprocessor_config.json. Flags given anyway must agree with it: a conflict is one error naming
both values. Weights that say nothing (a plain state dict, a Chinese-CLIP checkpoint) take the
flags, else the tools' defaults, with the text vocabulary sized to the tokenizer or to the weights.
"""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from data.files import InputError, read_json_object
from data.images.transform import IMAGE_MEAN, IMAGE_STD
from data.tokenizer import load_tokenizer, vocab_file
from models.config import list_model_configs, load_text_config, load_vision_config
from models.text import ARCH_FIELDS
from models.weights import (check_architecture, clip_state_from_object, convert_hf, expected_state,
                            load_weights_file, ours_from_hf_config, text_shape)
from models.weights.model_file import configs, unwrap, vocab_sha256

from .naming import DEFAULT_CONTEXT, DEFAULT_TEXT, DEFAULT_VISION, TRAIN_FLAGS, Flags, model_path


@dataclass
class Description:
    """What a source says it is (None: it does not say)."""
    what: str                              # where it says so, for messages
    vision: Any                            # VisionConfig
    text: Any                              # BertConfig, vocab_size = the tokenizer's
    vocab_text: Optional[str] = None       # the vocabulary itself (a model file carries it)
    vocab_path: Optional[Path] = None      # a vocab.txt on disk with exactly that content, if any
    context_length: Optional[int] = None
    image: Optional[Dict[str, Any]] = None


@dataclass
class ModelSource:
    """A named model, resolved: its weights (our state dict; None for random weights), configs,
    tokenizer, context length and image preprocessing."""
    path: Optional[Path]
    state: Optional[Dict[str, torch.Tensor]]
    vision: Any
    text: Any
    tokenizer: Any                         # None when no vocabulary is known
    context_length: int
    image: Dict[str, Any]                  # resolution, mean, std, resize (None: not recorded)
    vocab_path: Optional[Path] = None
    vocab_text: Optional[str] = None
    record: Optional[Dict[str, Any]] = field(default=None, repr=False)
    report: Any = None                     # the ConversionReport of reading the weights

    def write_vocab(self, folder) -> Optional[Path]:
        """A vocab.txt for writers that want a file: the one given or found, else the carried one
        written into `folder`."""
        return _vocab_on_disk(self.vocab_path, self.vocab_text, folder)


def _vocab_on_disk(vocab_path: Optional[Path], vocab_text: Optional[str], folder) -> Optional[Path]:
    if vocab_path is not None or vocab_text is None:
        return vocab_path
    path = Path(folder) / "vocab.txt"
    path.write_text(vocab_text, encoding="utf-8")
    return path


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _from_record(record: Dict[str, Any], path: Path) -> Description:
    vision, text = configs(record, source=str(path))
    vocab = record["vocab"]
    on_disk = Path(vocab.get("path") or "")
    # The file the run read its vocabulary from, when it is still there unchanged (train.py needs a path).
    same = on_disk.is_file() and vocab_sha256(on_disk) == vocab["sha256"]
    return Description(f"{path.name}'s record", vision, text, vocab_text=vocab["text"],
                       vocab_path=on_disk if same else None, context_length=int(record["context_length"]),
                       image=dict(record["image"]))


def _from_hf_folder(path: Path) -> Description:
    vision, text = ours_from_hf_config(read_json_object(path / "config.json"), str(path / "config.json"))
    vocab = path / "vocab.txt"
    text_of_vocab = vocab.read_text(encoding="utf-8") if vocab.is_file() else None
    image = {"resolution": vision.image_resolution, "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD),
             "resize": "squash"}  # Chinese-CLIP's preprocessing, unless the folder's processor says otherwise
    proc = path / "preprocessor_config.json"
    if proc.is_file():
        p = read_json_object(proc)
        image.update(resize="center-crop" if p.get("do_center_crop") else "squash",
                     mean=list(p.get("image_mean", image["mean"])), std=list(p.get("image_std", image["std"])))
    return Description(f"{path.name}/config.json", vision, text, vocab_text=text_of_vocab,
                       vocab_path=vocab if text_of_vocab is not None else None, image=image)


def _described(path: Optional[Path], record: Optional[Dict[str, Any]]) -> Optional[Description]:
    """describe() for weights already read (read_state's record)."""
    if record is not None:
        return _from_record(record, path)
    return _from_hf_folder(path) if path is not None and path.is_dir() else None


def describe(path: Optional[Path]) -> Optional[Description]:
    """What the weights at `path` (model_path's answer) say they are; None when they say nothing.
    A model file is memory-mapped: only its record is read."""
    if path is None:
        return None
    if path.is_dir():
        return _from_hf_folder(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (not a zip-format torch file: safetensors, legacy; it records nothing)
        return None
    record = unwrap(obj, path)[1] if isinstance(obj, dict) else None
    return _from_record(record, path) if record is not None else None


def config_names(vision, text):
    """(vision, text) names of the named configs (models/configs) these configs are, the text one up
    to its vocabulary's size; None where none is."""
    names = list_model_configs()
    return (next((n for n in names["vision"] if vision is not None and load_vision_config(n) == vision), None),
            next((n for n in names["text"] if text is not None and not _text_diff(load_text_config(n), text)), None))


def summary(desc: Description) -> str:
    """One phrase naming a described model, e.g. `ViT-demo-64 + BERT-demo (36 tokens), context 16`."""
    vision, text = config_names(desc.vision, desc.text)
    vision = vision or f"ViT width {desc.vision.vision_width} x {desc.vision.vision_layers} layers"
    text = text or f"BERT hidden {desc.text.hidden_size} x {desc.text.num_hidden_layers} layers"
    context = f", context {desc.context_length}" if desc.context_length else ""
    return f"{vision} + {text} ({desc.text.vocab_size} tokens){context}"


def _text_diff(a, b):
    """The architecture fields two text configs disagree on; the vocabulary's size is the tokenizer's."""
    return [k for k in ARCH_FIELDS if k != "vocab_size" and getattr(a, k) != getattr(b, k)]


def _arch(text) -> Dict[str, Any]:
    return {k: getattr(text, k) for k in ARCH_FIELDS}


def check_agreement(desc: Description, path: Path, flags: Flags = Flags(), model: Optional[str] = None,
                    text_model: Optional[str] = None, vocab: Optional[str] = None,
                    context_length: Optional[int] = None, resize: Optional[str] = None) -> None:
    """Flags given explicitly must agree with what the source says; a conflict names both values."""
    if model and load_vision_config(model) != desc.vision:
        raise InputError(f"{flags.model} {model} ({load_vision_config(model).to_dict()}) conflicts with {path}, "
                         f"whose {desc.what} says {desc.vision.to_dict()}; drop {flags.model} to use the file's")
    if text_model:
        want = load_text_config(text_model, vocab_size=desc.text.vocab_size)
        diff = _text_diff(want, desc.text)
        if diff:
            raise InputError(f"{flags.text_model} {text_model} conflicts with {path}: " + ", ".join(
                f"{k} {getattr(want, k)} vs {getattr(desc.text, k)} recorded" for k in diff)
                + f"; drop {flags.text_model}")
    if vocab and desc.vocab_text is not None and \
            vocab_sha256(vocab) != _sha256(desc.vocab_text):
        raise InputError(f"{flags.vocab} {vocab} is not the vocabulary {path} was trained with (its {desc.what} "
                         f"carries another, sha256 {_sha256(desc.vocab_text)[:12]}...); drop {flags.vocab} to "
                         f"use the one the file carries")
    if context_length is not None and desc.context_length is not None and context_length != desc.context_length:
        raise InputError(f"{flags.context_length} {context_length} conflicts with {path}, trained with "
                         f"{desc.context_length}; drop {flags.context_length} to use the file's")
    if resize and desc.image and desc.image.get("resize") and resize != desc.image["resize"]:
        raise InputError(f"{flags.resize} {resize} conflicts with {path}, trained on images resized by "
                         f"{desc.image['resize']}; drop {flags.resize} to use the file's")


def read_state(path: Path):
    """(our state dict, record or None, ConversionReport) of any whole-CLIP source."""
    if path.is_dir():
        state, _, _, report = convert_hf(path)
        return state, None, report
    obj = load_weights_file(path)
    record = unwrap(obj, path)[1]
    state, report = clip_state_from_object(obj, path)
    return state, record, report


def _check_context(context: int, text) -> None:
    if context > text.max_position_embeddings:
        raise InputError(f"context length {context} exceeds the text model's max_position_embeddings "
                         f"{text.max_position_embeddings}")
    if context < 3:
        raise InputError(f"context length {context} is too short ([CLS], a token, [SEP])")


def _undescribed(path, state, tokenizer, flags, model, text_model, need_configs):
    """Configs of weights that say nothing about themselves: the flags, else the defaults."""
    if need_configs and not (model and text_model):
        raise InputError(f"{path} records no configs (not a model file of train.py --export, nor a "
                         f"ChineseCLIPModel folder): pass {flags.model} and {flags.text_model}")
    vision = load_vision_config(model or DEFAULT_VISION)
    if tokenizer is not None:
        vocab_size = len(tokenizer.get_vocab())
    elif state is not None and text_shape(state):  # no tokenizer: the weights say the vocabulary's size
        vocab_size = text_shape(state)["vocab_size"]
    else:
        vocab_size = None
    return vision, load_text_config(text_model or DEFAULT_TEXT, vocab_size=vocab_size)


def open_model(weights: Optional[str] = None, run: Optional[str] = None, model: Optional[str] = None,
               text_model: Optional[str] = None, vocab: Optional[str] = None,
               context_length: Optional[int] = None, resize: Optional[str] = None, flags: Flags = Flags(),
               need_weights: bool = False, need_configs: bool = False) -> ModelSource:
    """Resolve a model named by the flags (see the module docstring). need_weights: no random weights;
    need_configs: weights that say nothing need both config flags (a converter must not guess).
    Raises InputError (one line)."""
    path = model_path(weights, run, flags, required=need_weights)
    state = record = report = None
    if path is not None:
        state, record, report = read_state(path)
    desc = _described(path, record)
    tokenizer = load_tokenizer(vocab) if vocab else None
    if desc is not None:
        check_agreement(desc, path, flags, model, text_model, vocab, context_length, resize)
        vision, text = desc.vision, desc.text
        if tokenizer is None and desc.vocab_text is not None:
            with tempfile.TemporaryDirectory(prefix="clip-vocab-") as tmp:  # BertTokenizer keeps it in memory
                tokenizer = load_tokenizer(_vocab_on_disk(desc.vocab_path, desc.vocab_text, tmp))
        context = desc.context_length or context_length or DEFAULT_CONTEXT
        image = dict(desc.image)
    else:
        vision, text = _undescribed(path, state, tokenizer, flags, model, text_model, need_configs)
        context = context_length or DEFAULT_CONTEXT
        image = {"resolution": vision.image_resolution, "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD),
                 "resize": resize}
    _check_context(int(context), text)
    if state is not None:
        check_architecture(state, expected_state(vision, text, logit_bias="logit_bias" in state), str(path))
    return ModelSource(path, state, vision, text, tokenizer, int(context), image,
                       vocab_path=Path(vocab_file(vocab)) if vocab else (desc.vocab_path if desc else None),
                       vocab_text=desc.vocab_text if desc else None, record=record, report=report)


def load_weights_into(model, weights: str, flags: Flags = TRAIN_FLAGS) -> str:
    """Load a whole CLIP named as above into `model` (train's --init-from): every tensor is checked
    against the model first; returns the report."""
    path = model_path(weights, None, flags)
    state, record, report = read_state(path)
    desc = _described(path, record)
    if desc is not None and (desc.vision != model.vision_config or _text_diff(model.text_config, desc.text)):
        # What the shapes cannot tell (heads, activations) the source's configs do.
        raise InputError(f"{path}: its {desc.what} says vision {desc.vision.to_dict()}, text "
                         f"{_arch(desc.text)}; the model is vision {model.vision_config.to_dict()}, text "
                         f"{_arch(model.text_config)}")
    model.add_logit_bias_if_in(state)
    check_architecture(state, model.state_dict(), str(path))
    model.load_state_dict(state, strict=True)
    return str(report)
