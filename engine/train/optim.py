"""AdamW with the usual CLIP exemptions from weight decay, layer-wise learning-rate decay per tower,
and warmup-then-cosine learning rates.

Decay shrinks weights towards zero; on a bias, a norm's gain, an embedding table or the logit
temperature that is a pull towards a wrong value, not regularisation, so they get weight_decay 0
(as in Chinese-CLIP and open_clip).

Layer-wise decay (EVA-CLIP's --visual-ld / --text-ld, BEiT's layer decay): a tower's layer l of
depth D (models.towers: 0 = embeddings, D = what follows the last block) learns at lr x d^(D - l),
so the embeddings learn slowest and the top fastest; logit scale and bias at lr.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Tuple

import torch

from engine.train.ops import jit_build_notice
from models.towers import place_of, tower_depths

log = logging.getLogger(__name__)

# Chinese-CLIP's AdamW settings (beta2 0.98, eps 1e-6 suit large-batch contrastive training).
BETAS = (0.9, 0.98)
EPS = 1e-6


def no_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters that must not be decayed: every vector (biases, LayerNorm weights,
    class_embedding, logit_scale) plus embedding tables (positional_embedding, BERT embeddings)."""
    lowered = name.lower()
    return (param.ndim < 2 or "embedding" in lowered or "norm" in lowered or "logit_scale" in lowered)


def param_groups(model: torch.nn.Module, weight_decay: float,
                 layer_decay: Optional[Dict[str, float]] = None) -> List[Dict]:
    """AdamW groups over the trainable parameters (a frozen one is left out entirely, so no optimizer
    state exists for it). Without layer_decay: two groups, "decay" and "no_decay". With it
    ({"image": d, "text": d}; a missing tower or 1.0 means no decay there): one pair per tower
    layer, named "image.L03.decay" etc., each with "lr_scale" d^(depth - layer)."""
    if not layer_decay or all(d == 1.0 for d in layer_decay.values()):
        decay, exempt = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (exempt if no_decay(name, p) else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
                  {"params": exempt, "weight_decay": 0.0, "name": "no_decay"}]
        return [g for g in groups if g["params"]]
    depths, by_name = tower_depths(model), {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        place = place_of(name, depths)
        d = layer_decay.get(place.tower, 1.0) if place.tower else 1.0
        scale = d ** (place.depth - place.layer)
        key = (f"{place.tower}.L{place.layer:02d}" if place.tower else "other") + \
            (".no_decay" if no_decay(name, p) else ".decay")
        group = by_name.setdefault(key, {"params": [], "weight_decay": 0.0 if key.endswith("no_decay") else
                                         weight_decay, "name": key, "lr_scale": scale})
        group["params"].append(p)
    # "other" (the logit scale, lr x 1) first: the log's and TensorBoard's train/lr read group 0
    return [by_name[k] for k in sorted(by_name, key=lambda k: (not k.startswith("other"), k))]


def describe_groups(groups: List[Dict], lr: float) -> List[str]:
    """Log lines: each group's parameters, weight decay and learning rate."""
    lines = [f"{len(groups)} parameter groups ({sum(p.numel() for g in groups for p in g['params']) / 1e6:.2f}M "
             "trainable parameters):"]
    for g in groups:
        scale = g.get("lr_scale", 1.0)
        lines.append(f"  {g['name']:<18} {sum(p.numel() for p in g['params']):>11,d} params  "
                     f"wd {g['weight_decay']:g}  lr {lr * scale:.3g} (x{scale:.4g})")
    return lines


def tower_lr_scalars(groups: List[Dict], lrs: List[float]) -> Dict[str, float]:
    """TensorBoard scalars of the learning rate of each tower layer (train/lr_image/L03, ...), from the
    groups param_groups made and the optimizer's current rates in the same order; {} without decay."""
    out = {}
    for g, lr in zip(groups, lrs):
        tower, _, rest = g["name"].partition(".")
        if tower in ("image", "text"):
            out[f"train/lr_{tower}/{rest.partition('.')[0]}"] = lr
    return out


def _apex_fused_adam():
    """apex's FusedAdam when apex and its compiled CUDA extension are both importable, else None."""
    try:
        import amp_C  # noqa: F401  (the compiled part; the Python package alone is not enough)
        from apex.optimizers import FusedAdam
    except Exception:  # ImportError, or a broken build raising something else
        return None
    return FusedAdam


def build_optimizer(groups: List[Dict], lr: float, on_gpu: bool, offload: bool) -> Tuple[torch.optim.Optimizer, str]:
    """The optimizer for this device, and a short name for the log.

    offload (ZeRO-Offload): DeepSpeedCPUAdam, the only one DeepSpeed accepts there.
    GPU: apex FusedAdam, else DeepSpeed FusedAdam (JIT-built), else torch's fused AdamW.
    CPU: torch AdamW with its fused CPU kernel (no compile step).
    """
    # DeepSpeed's optimizers take plain dict groups: drop our "name" key, turn "lr_scale" into "lr".
    plain = [{**{k: v for k, v in g.items() if k not in ("name", "lr_scale")},
              **({"lr": lr * g["lr_scale"]} if "lr_scale" in g else {})} for g in groups]
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        jit_build_notice("CPUAdamBuilder", "DeepSpeed's CPU Adam op")
        return DeepSpeedCPUAdam(plain, lr=lr, betas=BETAS, eps=EPS, adamw_mode=True), "DeepSpeedCPUAdam"
    if on_gpu:
        apex_adam = _apex_fused_adam()
        if apex_adam is not None:
            return apex_adam(plain, lr=lr, betas=BETAS, eps=EPS, adam_w_mode=True), "apex FusedAdam"
        jit_build_notice("FusedAdamBuilder", "DeepSpeed's fused Adam op")
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(plain, lr=lr, betas=BETAS, eps=EPS, adam_w_mode=True), "DeepSpeed FusedAdam"
        except Exception as e:  # no nvcc/ninja to JIT-build the op: torch's fused kernel needs none
            log.warning("DeepSpeed FusedAdam unavailable (%s); using torch AdamW(fused=True)", e)
    # torch's fused kernel, on GPU as the fallback above and on CPU always: there the demo model's
    # AdamW step took 3.4 ms against 12.7 (single-tensor, torch's CPU default) at 1 thread, ~6 % of
    # a training step (README "Speed").
    return torch.optim.AdamW(plain, lr=lr, betas=BETAS, eps=EPS, fused=True), "torch AdamW (fused)"


class WarmupCosine:
    """LambdaLR factor: linear warmup over `warmup` steps to 1, then cosine down to 0 at `total`.

    Step s (0-based, the number of optimizer steps taken) uses (s+1)/warmup during warmup, so the
    first update is not wasted at lr 0.
    """

    def __init__(self, warmup: int, total: int):
        self.warmup = int(warmup)
        self.total = int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = self.total - self.warmup
        if span <= 0:
            return 1.0
        progress = min(step - self.warmup, span) / span
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler_factory(warmup: int, total_steps: int):
    """A callable for deepspeed.initialize(lr_scheduler=...): it builds the LambdaLR on the optimizer
    DeepSpeed hands it, so the schedule drives the optimizer that actually steps."""

    factor = WarmupCosine(warmup, total_steps)

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        # Wrapped in a plain function: LambdaLR then saves only its step count, and a resumed run
        # follows the schedule of its current flags (e.g. more --epochs) instead of the saved one.
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step))

    return make
