"""Rank worker: the chunked sigmoid loss (models.sigmoid_loss with engine.dist.visit_blocks) against
open_clip 3.3's SigLipLoss, the oracle, on the same features, logit scale and bias.

Every rank draws the same global batch (seeded) and takes its rows. For each of open_clip's
distribution modes (bidir, shift, reduce, gather) it records open_clip's loss and the gradients of
this rank's image and text rows, the scale and the bias; then ours, with the ring and the gather
exchange, whole blocks and small chunks, local and global loss. The largest absolute difference of
each against open_clip goes to OUT/rank{r}.json (the test asserts). Also against one process on the
whole batch (open_clip's SigLipLoss with world_size 1): the global loss's value, and the gradients
as the engine sees them (features W x, scale and bias averaged over ranks).

usage: sigmoid_loss_ranks.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from engine import dist
from models.sigmoid_loss import SigmoidLoss

ROWS_PER_RANK, DIM = 6, 16
MODES = ("bidir", "shift", "reduce", "gather")


def batch(world: int):
    g = torch.Generator().manual_seed(7)
    images = F.normalize(torch.randn(world * ROWS_PER_RANK, DIM, generator=g), dim=-1)
    # texts close to their images, so both the positive and the negative terms matter
    texts = F.normalize(images + 0.7 * torch.randn(world * ROWS_PER_RANK, DIM, generator=g), dim=-1)
    return images, texts


def loss_and_grads(fn, images, texts, scale, bias):
    leaves = [t.detach().clone().requires_grad_(True) for t in (images, texts, scale, bias)]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach().reshape(1)] + [t.grad.detach().clone() for t in leaves]


def max_diff(a, b):
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def main(out_dir: str) -> None:
    from open_clip.loss import SigLipLoss

    dist.init_distributed(use_deepspeed=False, always=True, timeout_s=120)
    rank, world = dist.rank(), dist.world_size()
    images, texts = batch(world)
    mine = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    scale, bias = torch.tensor([7.5]), torch.tensor([-2.0])
    args = (images[mine], texts[mine], scale, bias)

    res = {"world": world}
    oracle = {m: loss_and_grads(SigLipLoss(rank=rank, world_size=world, dist_impl=m), *args) for m in MODES}
    full = loss_and_grads(SigLipLoss(), images, texts, scale, bias)  # one process, whole batch
    for how in ("ring", "gather"):
        for chunk in (None, 4):
            local = loss_and_grads(SigmoidLoss(lambda t, f, g: dist.visit_blocks(t, f, g, how=how), rank, chunk), *args)
            glob = loss_and_grads(SigmoidLoss(lambda t, f, g: dist.visit_blocks(t, f, g, how=how), rank, chunk,
                                              local_loss=False, sum_ranks=dist.all_reduce_sum_with_grad,
                                              world_size=world), *args)
            key = f"{how}_chunk{chunk or 'block'}"
            res[key] = {m: max_diff(local, oracle[m]) for m in MODES}
            # What the engine makes of it: the features' gradients are W x one process's on these
            # rows, the scale's and bias's averaged over ranks are one process's.
            mean_scalars = [dist.all_reduce_sum(g.clone()) / world for g in local[3:]]
            res[key]["vs_one_process"] = max(max_diff([world * full[1][mine], world * full[2][mine]], local[1:3]),
                                             max_diff(mean_scalars, full[3:]))
            # global: the full-batch loss on every rank, with the same gradients as local
            res[key + "_global"] = {"loss_vs_one_process": abs(glob[0].item() - full[0].item()),
                                    "grads_vs_local": max_diff(glob[1:], local[1:])}
    # the oracle's own modes agree with each other (else a comparison with one of them proves little)
    res["oracle_modes_agree"] = max(max_diff(oracle[m], oracle["bidir"]) for m in MODES)
    res["grad_norm_texts"] = oracle["bidir"][2].norm().item()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
    dist.exit_process(0)
