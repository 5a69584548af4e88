"""Shared by every weight format: errors, reports, key and shape checks, reading and writing files.
The formats live in openai.py, roberta.py, chinese_clip.py, hf.py and model_file.py; the architecture
read from weights' shapes in shapes.py; load.py holds the entry points the trainer calls."""
from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from data.files import InputError, atomic_path, atomic_write

from ..clip import build_clip
from ..config import load_vision_config
from ..vit import VisionConfig, VisionTransformer

PathLike = Union[str, os.PathLike]

StateDict = Dict[str, torch.Tensor]

# Buffers some writers save and that carry no weights (transformers' position/token-type id ranges).
_BUFFER_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


class WeightConversionError(InputError):
    """A weight file does not match the expected layout; the message lists the offending keys."""


class VocabMismatchError(WeightConversionError):
    """The weights fit the model except for the text vocabulary's size (the tokenizer's)."""


# --------------------------------------------------------------------------------------------------
# Reports and key checks
# --------------------------------------------------------------------------------------------------

def summarize_keys(keys: Iterable[str], limit: int = 40) -> str:
    """Collapse layer indices so long key lists stay readable: `a.{0-11}.b.weight`."""
    groups: Dict[str, List[Tuple[int, ...]]] = {}
    for key in sorted(keys):
        numbers = tuple(int(n) for n in re.findall(r"(?<=\.)\d+(?=\.|$)", key))
        pattern = re.sub(r"(?<=\.)\d+(?=\.|$)", "#", key)
        groups.setdefault(pattern, []).append(numbers)
    lines = []
    for pattern, numbers in groups.items():
        text = pattern
        for pos in range(pattern.count("#")):
            values = sorted({n[pos] for n in numbers})
            text = text.replace("#", _ranges(values), 1)
        lines.append(text)
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more patterns"]
    return ", ".join(lines)


def _ranges(values: List[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    if values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}-{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


@dataclass
class ConversionReport:
    source: str
    target: str
    mapped: int = 0
    dropped: Dict[str, List[str]] = field(default_factory=dict)  # reason -> keys
    notes: List[str] = field(default_factory=list)

    def drop(self, reason: str, key: str) -> None:
        self.dropped.setdefault(reason, []).append(key)

    def __str__(self) -> str:
        lines = [f"{self.source} -> {self.target}: mapped {self.mapped} tensors"]
        for reason, keys in self.dropped.items():
            lines.append(f"  dropped {len(keys)} ({reason}): {summarize_keys(keys, limit=8)}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def check_keys(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], what: str,
               required: Optional[Iterable[str]] = None) -> None:
    """Raise WeightConversionError unless every `required` key (default: all expected) is present, no key
    is unknown and every shape matches."""
    required = set(expected if required is None else required)
    missing = sorted(required - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
             for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = [f"{what}: the weights do not match the model"]
        if missing:
            parts.append(f"missing {len(missing)}: {summarize_keys(missing, limit=1000)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {summarize_keys(unexpected, limit=1000)}")
        if wrong:
            parts.append(f"wrong shape {len(wrong)}: " + "; ".join(wrong))
        raise WeightConversionError("\n  ".join(parts))


def expected_shapes(vision: Union[str, PathLike, VisionConfig], text, vocab_size: Optional[int] = None
                    ) -> Dict[str, torch.Size]:
    """Our state dict's key -> shape for a pair of configs, without allocating weights."""
    with torch.device("meta"):
        model = build_clip(vision, text, vocab_size=vocab_size)
    return {k: v.shape for k, v in model.state_dict().items()}


def expected_state(vision, text, vocab_size: Optional[int] = None,
                   logit_bias: bool = False) -> Dict[str, torch.Tensor]:
    """Our state dict for a pair of configs as meta tensors (shapes only, no memory); logit_bias: a model
    trained with the sigmoid loss, which carries one."""
    with torch.device("meta"):
        model = build_clip(vision, text, vocab_size=vocab_size)
        if logit_bias:
            model.add_logit_bias()
        return model.state_dict()


def image_tower_shapes(vision: Union[str, PathLike, VisionConfig]) -> Dict[str, torch.Size]:
    """`visual.*` and `logit_scale` shapes of our model for a vision config."""
    with torch.device("meta"):
        visual = VisionTransformer(load_vision_config(vision))
    shapes = {"visual." + k: v.shape for k, v in visual.state_dict().items()}
    shapes["logit_scale"] = torch.Size([1])
    return shapes


# --------------------------------------------------------------------------------------------------
# Reading and writing files
# --------------------------------------------------------------------------------------------------

def is_torchscript(path: PathLike) -> bool:
    """TorchScript archives are zip files with a constants.pkl (torch.load refuses them with
    weights_only=True)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, IsADirectoryError):
        return False


def load_weights_file(path: PathLike) -> dict:
    """torch.load(weights_only=True) of a .pt/.bin, or a .safetensors file; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise WeightConversionError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if is_torchscript(path):
        raise WeightConversionError(
            f"{path}: this is a TorchScript archive (OpenAI's format). Convert it first with "
            f"`python launch/convert_weights.py openai-vit --input {path} --output OUT.pt`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for pickled code, RuntimeError for a truncated file, ...
        raise WeightConversionError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from None
    if not isinstance(obj, dict):
        raise WeightConversionError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def _tensors_only(obj: Mapping, path: PathLike) -> StateDict:
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightConversionError(f"{path}: not a state dict; non-tensor entries: {bad[:10]}")
    return dict(obj)


def save_state_dict(state: Mapping[str, torch.Tensor], path: PathLike) -> None:
    """Atomic torch.save of plain tensors (contiguous, detached), loadable with weights_only=True."""
    state = {k: v.detach().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_checkpoint_dict(obj: dict, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_config_json(data: dict, path: PathLike) -> None:
    with atomic_write(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")
