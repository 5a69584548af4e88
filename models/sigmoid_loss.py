"""SigLIP's pairwise sigmoid loss, exact over the global batch, in chunks whose logits are never kept.

For image rows I (this rank's n rows) and text rows T (every rank's), with z_ij = s * I_i.T_j + b:

    L_rank = (1/n) * sum_ij -log sigmoid(y_ij z_ij),   y_ij = +1 for the pair's own text, -1 otherwise
           = (1/n) * (sum_ij softplus(z_ij) - sum_i z_ii)        (softplus(-z) - softplus(z) = -z)

which is open_clip's SigLipLoss on every rank (its sum over the rank's images against all texts,
divided by the local image count). The mean over ranks of L_rank is the loss of one process on the
concatenated batch, so with the engine averaging gradients over ranks the step is exact.

Memory: the forward makes the logits one chunk (n rows x `chunk` text columns) at a time and keeps
only the loss; the backward makes each chunk again and turns it into gradients at once
(dL/dz = (sigmoid(z) - [own pair]) / n). Nothing of size n x (all texts) ever exists, so the loss's
extra memory per rank is O(n x chunk), whatever the number of ranks.

The text rows of the other ranks arrive through an injected `visit` (engine.dist.visit_blocks: a
ring or a gather); by default there is one rank. `visit(local, fn, with_grad)` calls fn(owner, block)
once for every rank's block of text rows (this rank's own included); with_grad, fn returns the
gradient for that block, and visit returns this rank's block's gradient summed over every rank
that used it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

# The paper's initialisation: logits = exp(t') * cosine + b with t' = log 10 and b = -10, so training
# starts with every pair predicted negative (most pairs are), not with a loss dominated by them.
SIGMOID_LOGIT_SCALE_INIT = math.log(10.0)
SIGMOID_LOGIT_BIAS_INIT = -10.0

Visit = Callable[[torch.Tensor, Callable[[int, torch.Tensor], Optional[torch.Tensor]], bool],
                 Optional[torch.Tensor]]


def one_rank_visit(local: torch.Tensor, fn, with_grad: bool) -> Optional[torch.Tensor]:
    """The visit of a single process: its own block is the only one."""
    return fn(0, local)


def _column_chunks(block: torch.Tensor, chunk: int):
    for start in range(0, block.shape[0], chunk):
        yield start, block[start:start + chunk]


def _own_pairs(z: torch.Tensor, start: int) -> torch.Tensor:
    """The logits of the positive pairs in a chunk of this rank's own block (a view of z): row i's own
    text is column i, so chunk columns [start, start + c) hold the pairs of rows start..start + c - 1."""
    c = min(z.shape[1], z.shape[0] - start)
    return z[start:start + c].diagonal() if c > 0 else z.new_zeros(0)


class _ChunkedSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, texts, scale, bias, visit, rank, chunk):
        n = images.shape[0]
        s, b = scale.reshape(()), bias.reshape(())
        total = images.new_zeros((), dtype=torch.float64)

        def score(owner: int, block: torch.Tensor):
            nonlocal total
            for start, cols in _column_chunks(block, chunk):
                z = (images @ cols.t()) * s + b
                part = F.softplus(z).sum()
                if owner == rank:
                    part = part - _own_pairs(z, start).sum()
                total = total + part.double()  # a sum over (n x all texts) terms: keep its digits
            return None

        visit(texts, score, False)
        ctx.save_for_backward(images, texts, scale, bias)
        ctx.visit, ctx.rank, ctx.chunk = visit, rank, chunk
        return (total / n).to(images.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        images, texts, scale, bias = ctx.saved_tensors
        n = images.shape[0]
        s, b = scale.reshape(()), bias.reshape(())
        g = grad_out.reshape(()) / n
        d_images = torch.zeros_like(images)
        d_scale = images.new_zeros((), dtype=torch.float64)
        d_bias = images.new_zeros((), dtype=torch.float64)

        def grads(owner: int, block: torch.Tensor) -> torch.Tensor:
            nonlocal d_scale, d_bias
            d_block = torch.empty_like(block)
            for start, cols in _column_chunks(block, ctx.chunk):
                raw = images @ cols.t()                       # the chunk's cosines, made again
                dz = torch.sigmoid(raw * s + b)
                if owner == ctx.rank:
                    _own_pairs(dz, start).sub_(1.0)
                dz.mul_(g)                                    # dL/dz of this chunk
                d_scale = d_scale + (dz * raw).sum().double()
                d_bias = d_bias + dz.sum().double()
                dz.mul_(s)                                    # dL/d(cosine)
                d_images.addmm_(dz, cols)
                torch.mm(dz.t(), images, out=d_block[start:start + cols.shape[0]])
            return d_block

        d_texts = ctx.visit(texts, grads, True)
        return (d_images, d_texts, d_scale.to(scale.dtype).reshape(scale.shape),
                d_bias.to(bias.dtype).reshape(bias.shape), None, None, None)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class SigmoidLoss(nn.Module):
    """The sigmoid loss of this rank's image rows against every rank's text rows (see the module
    docstring). forward(image_features, text_features, logit_scale, logit_bias): logit_scale is
    exp(t') as the model returns it; features should be L2-normalised. Computed in float32.

    visit: engine.dist.visit_blocks (ring or gather) under several ranks; rank: this rank.
    chunk: text columns per chunk (None: one rank's block at a time).
    local_loss=False: every rank returns the full-batch loss (the mean over ranks of the rank losses,
    through `sum_ranks`, a differentiable sum over ranks such as engine.dist.all_reduce_sum_with_grad);
    the gradients are the same either way, since the loss is a sum over pairs that no rank needs whole.
    """

    def __init__(self, visit: Visit = one_rank_visit, rank: int = 0, chunk: Optional[int] = None,
                 local_loss: bool = True, sum_ranks: Callable[[torch.Tensor], torch.Tensor] = _identity,
                 world_size: int = 1):
        super().__init__()
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 text rows, got {chunk}")
        self.visit, self.rank, self.chunk = visit, rank, chunk
        self.local_loss, self.sum_ranks, self.world_size = local_loss, sum_ranks, world_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
        n = image_features.shape[0]
        if text_features.shape[0] != n:
            raise ValueError(f"{n} image rows but {text_features.shape[0]} text rows")
        chunk = self.chunk or max(n, 1)
        loss = _ChunkedSigmoid.apply(image_features.float(), text_features.float(), logit_scale.float(),
                                     logit_bias.float(), self.visit, self.rank, chunk)
        if self.local_loss:
            return loss
        return self.sum_ranks(loss) / self.world_size


def dense_sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                       logit_bias: torch.Tensor) -> torch.Tensor:
    """The same loss for one process, with the whole logit matrix kept: the reference the chunked
    form is tested against, and the simplest statement of what it computes."""
    n = image_features.shape[0]
    z = logit_scale.float() * image_features.float() @ text_features.float().t() + logit_bias.float()
    labels = 2 * torch.eye(n, device=z.device) - 1
    return -F.logsigmoid(labels * z).sum() / n
