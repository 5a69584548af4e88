"""Rank worker: models.loss.DistillLoss with engine.dist.all_gather_with_grad against open_clip
3.3's DistillClipLoss (gather_with_grad=True), local and global loss, on the same features. Writes the
largest differences of the two terms and of the gradients of this rank's student features to
OUT/rank{r}.json (the test asserts).

usage: distill_loss_ranks.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from engine import dist
from models.loss import DistillLoss

ROWS, DIM, TEACHER_DIM = 5, 16, 24


def main(out_dir: str) -> None:
    from open_clip.loss import DistillClipLoss

    dist.init_distributed(use_deepspeed=False, always=True, timeout_s=120)
    rank, world = dist.rank(), dist.world_size()
    g = torch.Generator().manual_seed(100 + rank)
    images = F.normalize(torch.randn(ROWS, DIM, generator=g), dim=-1)
    texts = F.normalize(images + torch.randn(ROWS, DIM, generator=g), dim=-1)
    t_images = F.normalize(torch.randn(ROWS, TEACHER_DIM, generator=g), dim=-1)
    t_texts = F.normalize(t_images + 0.5 * torch.randn(ROWS, TEACHER_DIM, generator=g), dim=-1)
    scale, t_scale = torch.tensor([20.0]), torch.tensor([60.0])
    res = {}
    for local in (True, False):
        ref_leaves = [images.clone().requires_grad_(True), texts.clone().requires_grad_(True)]
        ref = DistillClipLoss(local_loss=local, gather_with_grad=True, rank=rank, world_size=world)
        ref_c, ref_d = ref(*ref_leaves, scale, t_images, t_texts, t_scale)
        (ref_c + ref_d).backward()
        leaves = [images.clone().requires_grad_(True), texts.clone().requires_grad_(True)]
        ours = DistillLoss(gather=dist.all_gather_with_grad, rank=rank, local_loss=local, weight=1.0)
        ours(*leaves, scale, t_images, t_texts, t_scale).backward()
        res["local" if local else "global"] = {
            "contrastive": abs(ours.parts["contrastive"].item() - ref_c.item()),
            "distill": abs(ours.parts["distill"].item() - ref_d.item()),
            "distill_value": ref_d.item(),
            "grads": max((a.grad - b.grad).abs().max().item() for a, b in zip(leaves, ref_leaves))}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
    dist.exit_process(0)
