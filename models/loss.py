"""Symmetric InfoNCE (CLIP's contrastive loss). The cross-rank gather is injected by the caller (the
engine passes dist.all_gather_with_grad); by default there is one rank and nothing to gather."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


def contrastive_loss(image_rows: torch.Tensor, text_rows: torch.Tensor, image_cols: torch.Tensor,
                     text_cols: torch.Tensor, logit_scale: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """Mean over rows i of (CE(image_i -> all texts) + CE(text_i -> all images)) / 2, where the positive
    of row i is column row_offset + i. Features should be L2-normalised.

    Computed in float32: logits of up to 100 x cosine lose too much precision in bf16/fp16."""
    n = image_rows.shape[0]
    if text_rows.shape[0] != n:
        raise ValueError(f"{n} image rows but {text_rows.shape[0]} text rows")
    if image_cols.shape[0] != text_cols.shape[0] or row_offset + n > image_cols.shape[0] or row_offset < 0:
        raise ValueError(f"rows {row_offset}..{row_offset + n} do not fit {image_cols.shape[0]} image / "
                         f"{text_cols.shape[0]} text columns")
    scale = logit_scale.float()
    logits_i2t = scale * image_rows.float() @ text_cols.float().t()
    logits_t2i = scale * text_rows.float() @ image_cols.float().t()
    labels = torch.arange(row_offset, row_offset + n, device=image_rows.device)
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class ClipLoss(nn.Module):
    """local_loss=True: this rank's rows against every rank's columns (rows offset by rank * batch);
    local_loss=False: every row against every column, the same full loss on each rank. With gradients
    flowing through `gather` and averaged over ranks by the engine, both give the exact full-batch
    gradient; local costs 1/world of the logits. Every rank must have the same batch size."""

    def __init__(self, gather: Callable[[torch.Tensor], torch.Tensor] = _identity, rank: int = 0,
                 local_loss: bool = True):
        super().__init__()
        self.gather, self.rank, self.local_loss = gather, rank, local_loss

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        all_images, all_texts = self.gather(image_features), self.gather(text_features)
        n = image_features.shape[0]
        if all_images.shape[0] % n:
            raise ValueError(f"gathered {all_images.shape[0]} rows from ranks with {n} rows here: "
                             "every rank needs the same batch size")
        if self.local_loss:
            return contrastive_loss(image_features, text_features, all_images, all_texts, logit_scale,
                                    row_offset=self.rank * n)
        return contrastive_loss(all_images, all_texts, all_images, all_texts, logit_scale, row_offset=0)
