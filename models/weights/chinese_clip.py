"""Chinese-CLIP checkpoints ({"epoch", "step", "name", "state_dict"}, keys prefixed `module.`, 0-dim
logit_scale) <-> our state dict."""
from __future__ import annotations

from typing import Mapping, Tuple

import torch

from .core import _BUFFER_SUFFIXES, ConversionReport, StateDict, WeightConversionError
from .roberta import _fix_legacy_names

# --------------------------------------------------------------------------------------------------
# Chinese-CLIP checkpoints
# --------------------------------------------------------------------------------------------------

def from_chinese_clip(checkpoint: Mapping, source: str = "Chinese-CLIP checkpoint") -> Tuple[StateDict, ConversionReport]:
    """{"state_dict": {"module.visual...": ...}} (or a bare state dict with or without `module.`) -> ours.
    Keys are checked against a model by the caller (load_pretrained_clip / the CLI)."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise WeightConversionError(f"{source}: 'state_dict' is not a dict")
    report = ConversionReport(source, "CLIP (ours)")
    if "epoch" in checkpoint or "step" in checkpoint:
        report.notes.append(f"checkpoint of {checkpoint.get('name', '?')!r}, epoch {checkpoint.get('epoch')}, "
                            f"step {checkpoint.get('step')}")
    out: StateDict = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightConversionError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        name = key[len("module."):] if key.startswith("module.") else key
        name = _fix_legacy_names(name)
        if name.startswith("bert.pooler."):
            report.drop("BERT pooler, unused by CLIP", key)
        elif name.endswith(_BUFFER_SUFFIXES):
            report.drop("index buffers, not weights", key)
        elif name == "logit_scale":
            out[name] = value.reshape(1)
        else:
            out[name] = value
    report.mapped = len(out)
    return out, report


def to_chinese_clip(state: Mapping[str, torch.Tensor], name: str = "converted", epoch: int = 0,
                    step: int = 0) -> dict:
    """Ours -> Chinese-CLIP's checkpoint dict: `module.` prefix, 0-dim logit_scale (as cn_clip builds it).
    The sigmoid loss's logit_bias is left out: cn_clip's model has no such parameter and loads strictly."""
    out = {}
    for key, value in state.items():
        if key == "logit_bias":
            continue
        value = value.detach().contiguous()
        out["module." + key] = value.reshape(()) if key == "logit_scale" else value
    return {"epoch": int(epoch), "step": int(step), "name": str(name), "state_dict": out}
