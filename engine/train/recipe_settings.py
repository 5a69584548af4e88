"""The recipe's settings: the loss, distillation, locked towers and layer-wise lr decay, read from the
flags (engine/train/flags.py) and checked with the others (engine/train/config.py calls
recipe_settings), so a combination that cannot apply fails in the first second with one line. What
they build is in engine/train/recipe.py. Light on imports: the command line answers before torch.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

from data.files import InputError


@dataclass(frozen=True)
class RecipeSettings:
    loss: str = "clip"                      # "clip" (softmax InfoNCE) or "siglip" (sigmoid)
    sigmoid_chunk: int = 0                  # text rows per chunk of the sigmoid loss; 0 = one rank's
    sigmoid_exchange: str = "ring"          # how its text rows reach every rank (engine.dist.visit_blocks)
    distill_from: Optional[str] = None      # teacher weights (anything --init-from takes)
    distill_model: Optional[str] = None     # its configs when the weights do not carry them
    distill_text_model: Optional[str] = None
    distill_weight: float = 1.0
    distill_device: Optional[str] = None    # None: the training device
    lock_image: bool = False
    lock_image_unlocked_layers: int = 0
    lock_image_proj: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_proj: bool = False
    image_lr_decay: float = 1.0
    text_lr_decay: float = 1.0

    def state_signature(self) -> Dict[str, object]:
        """What shapes a checkpoint's model and optimizer state (a resume must keep it): the loss (the
        logit bias), the locks (which parameters have optimizer state) and the layer decay (the
        groups and their rates). The teacher may change."""
        keep = ("loss", "lock_image", "lock_image_unlocked_layers", "lock_image_proj", "lock_text",
                "lock_text_unlocked_layers", "lock_text_proj", "image_lr_decay", "text_lr_decay")
        return {k: v for k, v in asdict(self).items() if k in keep}


def _device_or_refuse(name: str) -> str:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--distill-device {name}: not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"--distill-device {name}: no such CUDA device here "
                         f"({torch.cuda.device_count()} visible)")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--distill-device {name}: only cpu and cuda devices are supported")
    return str(device)


def _check_distillation(args: argparse.Namespace) -> None:
    given = [f for f, v in (("--distill-weight", args.distill_weight), ("--distill-device", args.distill_device),
                            ("--distill-model", args.distill_model), ("--distill-text-model", args.distill_text_model))
             if v is not None]
    if not args.distill_from:
        if given:
            raise InputError(f"{given[0]} applies to distillation: add --distill-from MODEL (or drop it)")
        return
    if not Path(args.distill_from).exists():
        raise InputError(f"--distill-from {args.distill_from}: no such file or directory")
    if args.loss == "siglip":
        raise InputError("--distill-from works with --loss clip: the teacher's softmax over a row needs the "
                         "whole row of logits, which the chunked sigmoid loss never holds")
    if args.distill_weight is not None and not args.distill_weight > 0:
        raise InputError(f"--distill-weight must be > 0, got {args.distill_weight}")


def _check_lock(args: argparse.Namespace, tower: str, blocks: int, locked: bool) -> None:
    unlocked, proj = getattr(args, f"lock_{tower}_unlocked_layers"), getattr(args, f"lock_{tower}_proj")
    if not locked and (unlocked or proj):
        flag = f"--lock-{tower}-unlocked-layers" if unlocked else f"--lock-{tower}-proj"
        raise InputError(f"{flag} applies to a locked tower: add --lock-{tower}")
    if not 0 <= unlocked <= blocks:
        raise InputError(f"--lock-{tower}-unlocked-layers {unlocked}: the {tower} tower has {blocks} blocks")


def recipe_settings(args: argparse.Namespace) -> RecipeSettings:
    """The recipe flags, checked: raise InputError (one line) for a combination that cannot apply."""
    from models.config import load_text_config, load_vision_config
    if args.sigmoid_chunk < 0 or (args.sigmoid_chunk and args.loss != "siglip"):
        raise InputError("--sigmoid-chunk must be >= 0 and applies to --loss siglip only")
    if args.sigmoid_exchange != "ring" and args.loss != "siglip":
        raise InputError("--sigmoid-exchange applies to --loss siglip only")
    _check_distillation(args)
    lock_image = args.lock_image or args.freeze_image_tower  # the old flag: the whole tower, projection too
    _check_lock(args, "image", load_vision_config(args.model).vision_layers, lock_image)
    _check_lock(args, "text", load_text_config(args.text_model).num_hidden_layers, args.lock_text)
    lock_image_proj = args.lock_image_proj or args.freeze_image_tower
    if lock_image and args.lock_text and lock_image_proj and args.lock_text_proj and not (
            args.lock_image_unlocked_layers or args.lock_text_unlocked_layers):
        raise InputError("both towers and both projections locked: nothing but the logit scale would train")
    for flag, d in (("--image-lr-decay", args.image_lr_decay), ("--text-lr-decay", args.text_lr_decay)):
        if not 0 < d <= 1:
            raise InputError(f"{flag} must be in (0, 1], got {d}")
    return RecipeSettings(
        loss=args.loss, sigmoid_chunk=args.sigmoid_chunk, sigmoid_exchange=args.sigmoid_exchange,
        distill_from=args.distill_from,
        distill_model=args.distill_model, distill_text_model=args.distill_text_model,
        distill_weight=1.0 if args.distill_weight is None else args.distill_weight,
        distill_device=_device_or_refuse(args.distill_device) if args.distill_device else None,
        lock_image=lock_image, lock_image_unlocked_layers=args.lock_image_unlocked_layers,
        lock_image_proj=lock_image_proj, lock_text=args.lock_text,
        lock_text_unlocked_layers=args.lock_text_unlocked_layers, lock_text_proj=args.lock_text_proj,
        image_lr_decay=args.image_lr_decay, text_lr_decay=args.text_lr_decay)
