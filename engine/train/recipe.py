"""The pieces of a run's recipe beyond its data and model (settings: engine/train/recipe_settings.py):
the loss (CLIP's softmax or SigLIP's sigmoid) with its collectives injected, distillation's teacher,
locked towers, layer-wise learning-rate decay per tower. The Trainer asks a Recipe for the model
prepared (logit bias, locks), the optimizer's parameter groups, the loss, the teacher, and the
figures of its log line.
"""
from __future__ import annotations

import functools
import logging
from typing import Dict, List, Optional, Tuple

import torch

from engine import dist
from engine.train.distill import Teacher, load_teacher
from engine.train.optim import describe_groups, param_groups, tower_lr_scalars
from engine.train.recipe_settings import RecipeSettings
from models import ClipLoss, DistillLoss, SigmoidLoss
from models.towers import lock_tower

log = logging.getLogger("clip")



def prepare_logits(model, loss: str) -> None:
    """The sigmoid loss needs a logit bias: weights trained with it bring theirs (and their scale);
    otherwise both start at SigLIP's values. The softmax loss has no use for a bias the weights bring."""
    if loss == "siglip" and model.logit_bias is None:
        model.start_sigmoid_logits()
        log.info("sigmoid loss: logit scale 10 and bias %.0f to start (SigLIP's initialisation)",
                 model.logit_bias.item())
    elif loss == "siglip":
        log.info("sigmoid loss: logit scale %.2f and bias %.2f from the weights", model.scale().item(),
                 model.logit_bias.item())
    elif model.logit_bias is not None:
        model.drop_logit_bias()
        log.info("the weights' logit_bias (sigmoid loss) is not used by --loss clip: dropped")


def apply_locks(model, s: RecipeSettings) -> None:
    for tower in ("image", "text"):
        if getattr(s, f"lock_{tower}"):
            n, proj = getattr(s, f"lock_{tower}_unlocked_layers"), getattr(s, f"lock_{tower}_proj")
            frozen = lock_tower(model, tower, n, proj)
            log.info("%s tower locked: %.2fM parameters frozen; trains its last %d blocks%s and %s projection",
                     tower, frozen / 1e6, n, " (and what follows them)" if n else "",
                     "not its" if proj else "its")


class Recipe:
    """The pieces of one run's recipe, built for the Trainer from cfg.recipe (see the module docstring)."""

    def __init__(self, cfg):
        self.cfg, self.s = cfg, cfg.recipe
        self.teacher: Optional[Teacher] = None
        self.groups: List[Dict] = []

    def prepare_model(self, model, tokenizer, store, dtype: torch.dtype) -> None:
        """After the weights are loaded: the logit bias, the locks, and the teacher."""
        prepare_logits(model, self.s.loss)
        apply_locks(model, self.s)
        if self.s.distill_from:
            device = torch.device(self.s.distill_device) if self.s.distill_device else dist.device()
            self.teacher = load_teacher(self.s.distill_from, self.s.distill_model, self.s.distill_text_model,
                                        tokenizer, store, self.cfg.context_length, device, dtype)

    def param_groups(self, model) -> List[Dict]:
        decay = {"image": self.s.image_lr_decay, "text": self.s.text_lr_decay}
        self.groups = param_groups(model, self.cfg.wd, decay)
        for line in describe_groups(self.groups, self.cfg.lr):
            log.info("%s", line)
        return self.groups

    def loss_fn(self):
        cfg, s = self.cfg, self.s
        if s.loss == "siglip":
            return SigmoidLoss(functools.partial(dist.visit_blocks, how=s.sigmoid_exchange), dist.rank(),
                               s.sigmoid_chunk or None, cfg.local_loss, dist.all_reduce_sum_with_grad,
                               dist.world_size())
        if self.teacher is not None:
            return DistillLoss(dist.all_gather_with_grad, dist.rank(), cfg.local_loss, s.distill_weight)
        return ClipLoss(gather=dist.all_gather_with_grad, rank=dist.rank(), local_loss=cfg.local_loss)

    def report(self, window, lrs: List[float]) -> Tuple[str, Dict[str, float]]:
        """The log line's tail and TensorBoard scalars for a window of steps (trainer._LogWindow):
        the loss's parts, the teacher's time, each tower layer's learning rate."""
        scalars = {f"train/loss_{name}": v / window.steps for name, v in window.parts.items()}
        text = "".join(f" {name} {v / window.steps:.4f}" for name, v in window.parts.items())
        if self.teacher is not None:
            seconds = self.teacher.take_seconds()  # this rank's teacher, in the window's steps
            per_step, share = seconds / window.steps, seconds / window.seconds if window.seconds > 0 else 0.0
            text += f" teacher {per_step:.3g} s/step ({100 * share:.0f}% of the step)"
            scalars["train/teacher_s_per_step"] = per_step
        return text, {**scalars, **tower_lr_scalars(self.groups, lrs)}
