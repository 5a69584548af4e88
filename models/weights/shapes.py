"""A model's architecture read from its weights' shapes: the vision config of OpenAI-layout ViT
weights, the named configs with the same shapes, and one phrase naming what a state dict holds (so a
mismatch is reported as "the weights are X; the model is Y")."""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

import torch

from ..config import list_model_configs, load_text_config, load_vision_config
from ..text import arch_dict
from ..vit import VisionConfig
from .core import WeightConversionError



def infer_vision_config(state: Mapping[str, torch.Tensor], prefix: str = "visual.") -> VisionConfig:
    """Read a ViT's shape from OpenAI-layout weights. Heads are not stored in the weights: we take them
    from the named config with the same shapes (ViT-H-14 uses 80-wide heads), else OpenAI's width // 64."""
    try:
        width = state[prefix + "class_embedding"].shape[0]
        patch = state[prefix + "conv1.weight"].shape[-1]
        positions = state[prefix + "positional_embedding"].shape[0]
        embed_dim = state[prefix + "proj"].shape[1]
    except KeyError as e:
        raise WeightConversionError(f"not a ViT in OpenAI's layout: no {e.args[0]!r} "
                                    f"(ResNet CLIP models are not supported)") from None
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise WeightConversionError(f"{prefix}positional_embedding has {positions} rows, not grid^2 + 1")
    layer_ids = {int(m.group(1)) for k in state
                 if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))}
    if not layer_ids or layer_ids != set(range(len(layer_ids))):
        raise WeightConversionError(f"{prefix}transformer.resblocks: layer indices {sorted(layer_ids)} "
                                    "are not 0..N-1")
    act = "quick_gelu"
    shape = dict(embed_dim=embed_dim, image_resolution=grid * patch, vision_layers=len(layer_ids),
                 vision_width=width, vision_patch_size=patch)
    named = match_vision_config(VisionConfig(**shape, vision_heads=max(1, width // 64), act=act))
    heads = load_vision_config(named).vision_heads if named else max(1, width // 64)
    return VisionConfig(**shape, vision_heads=heads, act=act)


def match_vision_config(cfg: VisionConfig) -> Optional[str]:
    """The named vision config with the same tensor shapes (heads and activation aside), if any."""
    keys = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size")
    for name in list_model_configs()["vision"]:
        named = load_vision_config(name)
        if all(getattr(named, k) == getattr(cfg, k) for k in keys):
            return name
    return None


def match_text_config(config) -> Optional[str]:
    """The named text config with the same architecture fields, if any."""
    want = arch_dict(config)
    for name in list_model_configs()["text"]:
        if arch_dict(load_text_config(name)) == want:
            return name
    return None


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
