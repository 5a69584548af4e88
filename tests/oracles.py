"""Optional reference implementations the tests compare against, and a meter for tensor memory.

open_clip_torch is the oracle for the losses (SigLipLoss, DistillClipLoss): tests that need it skip,
saying how to install it, when it is absent (`make test` installs tests/requirements-optional.txt).
"""
from __future__ import annotations

import pytest

OPEN_CLIP_PIP = "pip install --no-deps open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4"


def open_clip_loss():
    """open_clip.loss, or a skip that names the pip command."""
    return pytest.importorskip("open_clip.loss", reason=f"optional oracle: {OPEN_CLIP_PIP} "
                               "(or pip install -r tests/requirements-optional.txt)")


def peak_tensor_bytes(fn) -> int:
    """The most CPU tensor memory alive at once while fn() runs, counted from what fn allocates and
    frees (torch.profiler's allocation events in time order; what autograd keeps is included)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import OpTree

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for node in OpTree(prof.profiler.kineto_results).sorted_nodes:
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            live += node.typed[1].alloc_size  # negative for a free
            peak = max(peak, live)
    return peak
