"""Where each parameter of a CLIP sits in its tower, and locking towers (LiT; open_clip's --lock-image /
--lock-text with unlocked layers; Chinese-CLIP's first stage with the image tower frozen).

A tower's layers, from the input up: 0 = the embeddings (image: conv1, class and positional
embeddings, ln_pre; text: bert.embeddings), 1..L = the transformer blocks, L + 1 = what follows them
(image: ln_post and the projection visual.proj; text: text_projection). The projections into the
shared space are told apart from the rest of the top layer: they may stay trainable in a locked tower.
logit_scale and logit_bias belong to no tower.

Locking a tower freezes a prefix of its computation (everything below its last N blocks), so
autograd records nothing there: neither the inputs nor those parameters need a gradient, so no
activation of a locked layer is kept for backward, and backward stops at the first trainable one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional

from torch import nn

TOWERS = ("image", "text")
_IMAGE_STEM = ("visual.conv1.", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.")
_IMAGE_BLOCK = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.")
_TEXT_BLOCK = re.compile(r"bert\.encoder\.layer\.(\d+)\.")


@dataclass(frozen=True)
class Place:
    tower: Optional[str]  # "image", "text", or None (logit scale and bias)
    layer: int            # 0 = embeddings, 1..depth - 1 = blocks, depth = the layer after the blocks
    depth: int            # the tower's top layer id (its blocks + 1)
    projection: bool = False


def tower_depths(model: nn.Module) -> Dict[str, int]:
    """The top layer id of each tower: its number of blocks + 1."""
    return {"image": model.vision_config.vision_layers + 1, "text": model.text_config.num_hidden_layers + 1}


def place_of(name: str, depths: Dict[str, int]) -> Place:
    """Where parameter `name` of a models.CLIP sits; an unknown name raises (a new parameter must be
    placed here, not silently trained at the wrong rate or left out of a lock)."""
    di, dt = depths["image"], depths["text"]
    if name.startswith(_IMAGE_STEM):
        return Place("image", 0, di)
    if (m := _IMAGE_BLOCK.match(name)):
        return Place("image", int(m.group(1)) + 1, di)
    if name.startswith("visual.ln_post.") or name == "visual.proj":
        return Place("image", di, di, projection=name == "visual.proj")
    if name.startswith("bert.embeddings."):
        return Place("text", 0, dt)
    if (m := _TEXT_BLOCK.match(name)):
        return Place("text", int(m.group(1)) + 1, dt)
    if name == "text_projection":
        return Place("text", dt, dt, projection=True)
    if name in ("logit_scale", "logit_bias"):
        return Place(None, 0, 0)
    raise ValueError(f"parameter {name!r} has no place in models.towers: add it there")


def lock_tower(model: nn.Module, tower: str, unlocked_layers: int = 0, lock_projection: bool = False) -> int:
    """Freeze `tower` ("image" or "text") except its last `unlocked_layers` blocks and, when any
    block trains, what follows them (the image tower's ln_post); its projection trains unless
    lock_projection. Returns the number of parameters (elements) frozen."""
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    depths = tower_depths(model)
    blocks = depths[tower] - 1
    if not 0 <= unlocked_layers <= blocks:
        raise ValueError(f"the {tower} tower has {blocks} blocks; cannot leave {unlocked_layers} unlocked")
    frozen = 0
    for name, p in model.named_parameters():
        place = place_of(name, depths)
        if place.tower != tower:
            continue
        if place.projection:
            trains = not lock_projection
        else:
            trains = unlocked_layers > 0 and place.layer > blocks - unlocked_layers
        p.requires_grad_(trains)
        frozen += 0 if trains else p.numel()
    return frozen
