"""The chunked sigmoid loss (models.sigmoid_loss) in one process: loss and every gradient equal
open_clip 3.3's SigLipLoss for any chunk size; it keeps no logits for backward (only its inputs) and
its peak memory follows the chunk, not the batch. The 2- and 4-rank checks are in
tests/dist/test_sigmoid_loss_ranks.py."""
import pytest
import torch
from torch.nn import functional as F

from models.sigmoid_loss import SigmoidLoss, dense_sigmoid_loss
from tests.oracles import open_clip_loss, peak_tensor_bytes


def _inputs(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(n, d, generator=g), dim=-1)
    return images, texts, torch.tensor([9.0]), torch.tensor([-4.0])


def _loss_and_grads(fn, *inputs):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("chunk", [None, 1, 5, 12, 100])
def test_equals_open_clip_siglip(chunk):
    oc = open_clip_loss()
    inputs = _inputs()
    ref = _loss_and_grads(oc.SigLipLoss(), *inputs)
    got = _loss_and_grads(SigmoidLoss(chunk=chunk), *inputs)
    assert ref[0].item() > 0.1 and all(g.abs().max() > 1e-3 for g in ref[1:])  # nothing trivially zero
    for name, a, b in zip(("loss", "images", "texts", "scale", "bias"), got, ref):
        assert torch.allclose(a, b.reshape(a.shape), atol=1e-5, rtol=0), (name, (a - b).abs().max())


def test_dense_reference_equals_open_clip():
    oc = open_clip_loss()
    inputs = _inputs(seed=3)
    for a, b in zip(_loss_and_grads(dense_sigmoid_loss, *inputs), _loss_and_grads(oc.SigLipLoss(), *inputs)):
        assert torch.allclose(a, b.reshape(a.shape), atol=1e-5, rtol=0)


def test_keeps_only_its_inputs_for_backward():
    """What autograd stores for the backward is the features, scale and bias: the logits are made
    again there, never kept (the dense loss keeps an n x n matrix)."""
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    inputs = [t.requires_grad_(True) for t in _inputs(n=64, d=8)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        SigmoidLoss(chunk=16)(*inputs)
    assert sorted(saved) == sorted(t.numel() for t in inputs), saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dense_sigmoid_loss(*inputs)
    assert max(saved) >= 64 * 64  # the meter sees a kept logit matrix when there is one


def test_peak_memory_follows_the_chunk_not_the_batch():
    n, d = 512, 8  # features small beside the n x n logits, so the logits' share shows
    inputs = [t.requires_grad_(True) for t in _inputs(n=n, d=d)]
    logits_bytes = n * n * 4

    def peak(fn):
        return peak_tensor_bytes(lambda: fn(*inputs).backward())

    chunked = peak(SigmoidLoss(chunk=16))
    dense = peak(dense_sigmoid_loss)
    assert dense > logits_bytes, (dense, logits_bytes)  # the meter sees the full matrix
    # a few n x 16 chunk buffers and the n x d gradients: under a quarter of one logit matrix
    assert chunked < logits_bytes / 4, (chunked, logits_bytes)
