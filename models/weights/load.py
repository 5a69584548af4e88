"""The entry points the trainer and the tools call to load a whole CLIP, or one tower, into a model:
whatever the source's format, every tensor is checked against the model's keys and shapes first, and a
mismatch is one error naming what the weights are and what the model is."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Tuple

import torch
from torch import nn

from .chinese_clip import from_chinese_clip
from .core import (_BUFFER_SUFFIXES, ConversionReport, PathLike, StateDict, VocabMismatchError,
                   WeightConversionError, _tensors_only, check_keys, load_weights_file)
from .hf import convert_hf, ours_from_hf_config
from .model_file import is_model_file
from .roberta import _fix_legacy_names, check_text_compatible, convert_roberta
from .shapes import describe_state, text_shape



def read_clip_weights(path: PathLike) -> Tuple[StateDict, ConversionReport]:
    """Any full-CLIP source -> our state dict: a ChineseCLIPModel folder, a Chinese-CLIP checkpoint,
    our model file (model_file.py) or plain state dict (save_state_dict), or {"module": ...}."""
    path = Path(path)
    if path.is_dir():
        state, _, _, report = convert_hf(path)
        return state, report
    return clip_state_from_object(load_weights_file(path), path)


def clip_state_from_object(obj: Mapping, path: PathLike) -> Tuple[StateDict, ConversionReport]:
    """read_clip_weights for a file already loaded (load_weights_file)."""
    if is_model_file(obj):
        state = _tensors_only(obj["weights"], path)
        return state, ConversionReport(f"model file {path}", "CLIP (ours)", mapped=len(state))
    if "state_dict" in obj:
        return from_chinese_clip(obj, f"Chinese-CLIP checkpoint {path}")
    if isinstance(obj.get("module"), Mapping):
        return from_chinese_clip(obj["module"], f"checkpoint {path} ('module')")
    state = _tensors_only(obj, path)
    if any(k.startswith("module.") for k in state):
        return from_chinese_clip(state, f"state dict {path}")
    report = ConversionReport(f"state dict {path}", "CLIP (ours)", mapped=len(state))
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(1)
    return state, report


def _model_shapes(model: nn.Module) -> Dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def _copy_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    assert not unexpected, unexpected  # check_keys ran first


def load_image_tower(model: nn.Module, path: PathLike) -> str:
    """Load a converted image-tower file (`visual.*`, optionally `logit_scale`) into `model`."""
    state = _tensors_only(load_weights_file(path), path)
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(1)
    shapes = _model_shapes(model)
    allowed = {k: v for k, v in shapes.items() if k.startswith("visual.") or k == "logit_scale"}
    check_keys(state, allowed, str(path), required=[k for k in allowed if k.startswith("visual.")])
    _copy_into(model, state)
    return f"image tower: loaded {len(state)} tensors from {path}"


def load_text_tower(model: nn.Module, path: PathLike) -> str:
    """Load a text tower into `model`: a RoBERTa folder, or a converted `bert.*` file (which may also hold
    `text_projection`)."""
    path = Path(path)
    report = None
    if path.is_dir():
        state, config, report = convert_roberta(path)
        check_text_compatible(model.bert.config, config, str(path))
    else:
        state = _tensors_only(load_weights_file(path), path)
        state = {_fix_legacy_names(k): v for k, v in state.items() if not k.endswith(_BUFFER_SUFFIXES)}
    shapes = _model_shapes(model)
    allowed = {k: v for k, v in shapes.items() if k.startswith("bert.") or k == "text_projection"}
    check_keys(state, allowed, str(path), required=[k for k in allowed if k.startswith("bert.")])
    _copy_into(model, state)
    head = f"text tower: loaded {len(state)} tensors from {path}"
    return head if report is None else f"{head}\n{report}"


def load_pretrained_clip(model: nn.Module, path: PathLike) -> str:
    """Load a whole CLIP: a Chinese-CLIP checkpoint, a ChineseCLIPModel folder or our own state dict.
    Every tensor of the model must be present with the right shape."""
    path = Path(path)
    state, report = read_clip_weights(path)
    if path.is_dir():
        vision, text = ours_from_hf_config(json.loads((path / "config.json").read_text()), str(path))
        if vision.vision_heads != model.vision_config.vision_heads or vision.act != model.vision_config.act:
            raise WeightConversionError(f"{path}: vision heads/act {vision.vision_heads}/{vision.act} differ "
                                        f"from the model's {model.vision_config.vision_heads}/{model.vision_config.act}")
        check_text_compatible(model.bert.config, text, str(path))
    model.add_logit_bias_if_in(state)
    check_architecture(state, model.state_dict(), str(path))
    _copy_into(model, state)
    return str(report)


def check_architecture(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], what: str) -> None:
    """check_keys, but a different architecture is one line naming what the weights are (read from
    their shapes) and what the model is, and a different text vocabulary raises VocabMismatchError."""
    try:
        check_keys(state, {k: v.shape for k, v in model_state.items()}, what)
    except WeightConversionError:
        emb = "bert.embeddings.word_embeddings.weight"
        wrong = {k for k in set(state) & set(model_state) if tuple(state[k].shape) != tuple(model_state[k].shape)}
        if set(state) == set(model_state) and wrong == {emb}:
            raise VocabMismatchError(
                f"{what}: the weights' text vocabulary has {state[emb].shape[0]} tokens, the model's "
                f"{model_state[emb].shape[0]}: use the tokenizer (vocab.txt) the weights were trained with") from None
        theirs, ours = describe_state(state), describe_state(model_state)
        if theirs != ours or text_shape(state) != text_shape(model_state):
            raise WeightConversionError(f"{what}: the weights are {theirs}; the model is {ours}") from None
        raise
