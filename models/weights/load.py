"""Weight formats in and out of our CLIP state dict: the entry points, and every format re-exported.

One module per format: convert_openai.py, convert_roberta.py, convert_chinese_clip.py, convert_hf.py,
sharing convert_core.py.

Our state dict ("ours"): `visual.*` (OpenAI ViT layout), `bert.*` (BertModel without pooler),
`text_projection` [text_hidden, embed_dim], `logit_scale` [1]. Formats:

- OpenAI's TorchScript checkpoint (ViT-B-16.pt as distributed) -> `visual.*` + `logit_scale`. Only
  `convert_openai` calls torch.jit.load, which executes code stored in the file; everything else loads
  with weights_only=True.
- A Chinese RoBERTa folder (config.json or bert_config.json, pytorch_model.bin or model.safetensors,
  keys prefixed `bert.`) -> `bert.*`; MLM/NSP heads and pooler ignored.
- Chinese-CLIP checkpoints ({"epoch", "step", "name", "state_dict"}, keys prefixed `module.`, 0-dim
  logit_scale) <-> ours.
- A transformers ChineseCLIPModel folder (save_pretrained / from_pretrained) <-> ours.

Every conversion returns a ConversionReport (what was mapped, what was dropped and why) and raises
WeightConversionError, listing keys, on unmapped, missing or wrongly shaped tensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Tuple

import torch
from torch import nn

from .convert_core import (  # noqa: F401  (re-exported: callers use models.convert.X)
    ConversionReport, PathLike, StateDict, VocabMismatchError, WeightConversionError, _BUFFER_SUFFIXES,
    _tensors_only, check_keys, expected_shapes, expected_state, image_tower_shapes, infer_vision_config,
    is_torchscript, load_weights_file, match_text_config, match_vision_config, save_checkpoint_dict,
    save_state_dict, summarize_keys, write_config_json)
from .convert_openai import convert_openai  # noqa: F401
from .convert_roberta import (  # noqa: F401
    _fix_legacy_names, _read_folder_weights, check_text_compatible, convert_roberta, read_roberta_config)
from .convert_chinese_clip import from_chinese_clip, to_chinese_clip  # noqa: F401
from .convert_hf import (  # noqa: F401
    convert_hf, export_hf, from_hf_state, hf_config_from_ours, ours_from_hf_config, to_hf_state)


# --------------------------------------------------------------------------------------------------
# Entry points the trainer calls
# --------------------------------------------------------------------------------------------------

def read_clip_weights(path: PathLike) -> Tuple[StateDict, ConversionReport]:
    """Any full-CLIP source -> our state dict: a ChineseCLIPModel folder, a Chinese-CLIP checkpoint,
    our model file (models/model_file.py) or plain state dict (save_state_dict), or {"module": ...}."""
    path = Path(path)
    if path.is_dir():
        state, _, _, report = convert_hf(path)
        return state, report
    return clip_state_from_object(load_weights_file(path), path)


def clip_state_from_object(obj: Mapping, path: PathLike) -> Tuple[StateDict, ConversionReport]:
    """read_clip_weights for a file already loaded (load_weights_file)."""
    from .model_file import is_model_file

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
    check_architecture(state, model.state_dict(), str(path))
    _copy_into(model, state)
    return str(report)


def check_architecture(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], what: str) -> None:
    """check_keys, but a different architecture is one line naming what the weights are (read from
    their shapes) and what the model is, and a different text vocabulary raises VocabMismatchError."""
    from .model_file import describe_state, text_shape

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
