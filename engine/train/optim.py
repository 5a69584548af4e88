"""AdamW with the usual CLIP exemptions from weight decay, and warmup-then-cosine learning rates.

Decay shrinks weights towards zero; on a bias, a norm's gain, an embedding table or the logit
temperature that is a pull towards a wrong value, not regularisation, so they get weight_decay 0
(as in Chinese-CLIP and open_clip).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Tuple

import torch

from engine.train.ops import jit_build_notice

log = logging.getLogger(__name__)

# Chinese-CLIP's AdamW settings (beta2 0.98, eps 1e-6 suit large-batch contrastive training).
BETAS = (0.9, 0.98)
EPS = 1e-6


def no_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters that must not be decayed: every vector (biases, LayerNorm weights,
    class_embedding, logit_scale) plus embedding tables (positional_embedding, BERT embeddings)."""
    lowered = name.lower()
    return (param.ndim < 2 or "embedding" in lowered or "norm" in lowered or "logit_scale" in lowered)


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """Two AdamW groups over the trainable parameters (a frozen tower is left out entirely)."""
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (exempt if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": exempt, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


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
    # DeepSpeed's optimizers take plain dict groups; drop our cosmetic "name" key for them.
    plain = [{k: v for k, v in g.items() if k != "name"} for g in groups]
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
