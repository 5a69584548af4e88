"""Optional NVIDIA apex fused LayerNorm, behind a guard.

apex is never a requirement (PyPI's "apex" is an unrelated package; NVIDIA's builds only from source
with CUDA). When both the Python package and its compiled extension `fused_layer_norm_cuda` import,
CUDA inputs go through apex's fused kernel; everything else (CPU, no apex, a broken build) uses
torch's own layer_norm. `LayerNorm` subclasses `nn.LayerNorm`, so parameter names (`weight`, `bias`)
and state dicts are identical either way. Set CLIP_NO_APEX=1 to force the torch path.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F


def _import_apex_layer_norm():
    if os.environ.get("CLIP_NO_APEX", "") not in ("", "0"):
        return None
    try:
        # The Python package alone is not enough: without the compiled extension apex fails at the
        # first call, not at import.
        import fused_layer_norm_cuda  # noqa: F401
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    except Exception:  # ImportError, or OSError/RuntimeError from a build against another CUDA
        return None
    return fused_layer_norm_affine


_fused_affine = _import_apex_layer_norm()


def apex_available() -> bool:
    return _fused_affine is not None


def _use_fused(x: torch.Tensor) -> bool:
    # apex's kernels are CUDA-only.
    return _fused_affine is not None and x.is_cuda


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that uses apex's fused CUDA kernel when it is installed and the input is on a GPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.bias is not None and _use_fused(x):
            return _fused_affine(x, self.weight, self.bias, self.normalized_shape, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def swap_layer_norms(module: nn.Module) -> int:
    """Replace every plain nn.LayerNorm inside `module` by `LayerNorm`, keeping its parameters (and so its
    state-dict names). Used on transformers' BertModel, whose LayerNorms we do not construct ourselves.
    Returns how many were swapped."""
    count = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:  # exact type: leave subclasses (and ours) alone
                new = LayerNorm(child.normalized_shape, eps=child.eps,
                                elementwise_affine=child.elementwise_affine,
                                bias=child.bias is not None, device="meta")
                new.weight, new.bias = child.weight, child.bias  # the same Parameter objects
                setattr(parent, name, new)
                count += 1
    return count
