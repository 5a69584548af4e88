"""Distillation's loss (models.loss.DistillLoss) against open_clip 3.3's DistillClipLoss on the same
features and scales: both terms within 1e-6, and the student's gradients; a teacher whose embedding
size differs from the student's works (the logits are batch x batch either way). The 2-rank check
is in tests/dist/test_distill_loss_ranks.py."""
import pytest
import torch
from torch.nn import functional as F

from models.loss import ClipLoss, DistillLoss
from tests.oracles import open_clip_loss


def _features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return images, F.normalize(images + torch.randn(n, d, generator=g), dim=-1)


@pytest.mark.parametrize("teacher_dim", [16, 24])
def test_equals_open_clip_distill_clip_loss(teacher_dim):
    oc = open_clip_loss()
    images, texts = _features(10, 16, 0)
    t_images, t_texts = _features(10, teacher_dim, 1)
    scale, t_scale = torch.tensor([20.0]), torch.tensor([50.0])
    leaves = [images.clone().requires_grad_(True), texts.clone().requires_grad_(True)]
    ref_c, ref_d = oc.DistillClipLoss()(*leaves, scale, t_images, t_texts, t_scale)
    (ref_c + 0.5 * ref_d).backward()
    ref_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    loss_fn = DistillLoss(weight=0.5)
    total = loss_fn(*leaves, scale, t_images, t_texts, t_scale)
    total.backward()
    assert ref_d.item() > 0.1 and abs(ref_c.item() - ref_d.item()) > 1e-3  # two distinct, non-trivial terms
    assert abs(loss_fn.parts["contrastive"].item() - ref_c.item()) < 1e-6
    assert abs(loss_fn.parts["distill"].item() - ref_d.item()) < 1e-6
    assert abs(total.item() - (ref_c + 0.5 * ref_d).item()) < 1e-6
    for a, b in zip((t.grad for t in leaves), ref_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_weight_zero_is_the_contrastive_loss():
    images, texts = _features(8, 16, 2)
    t_images, t_texts = _features(8, 8, 3)
    scale = torch.tensor([30.0])
    got = DistillLoss(weight=0.0)(images, texts, scale, t_images, t_texts, torch.tensor([10.0]))
    assert torch.allclose(got, ClipLoss()(images, texts, scale))
