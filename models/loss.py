"""Symmetric InfoNCE (CLIP's contrastive loss), and distillation from a teacher's logits. The
cross-rank gather is injected by the caller (the engine passes dist.all_gather_with_grad); by default
there is one rank and nothing to gather. The sigmoid loss is in models/sigmoid_loss.py."""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import nn
from torch.nn import functional as F


def clip_logits(image_rows: torch.Tensor, text_rows: torch.Tensor, image_cols: torch.Tensor,
                text_cols: torch.Tensor, logit_scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(image rows -> text columns, text rows -> image columns) logits, in float32: logits of up to
    100 x cosine lose too much precision in bf16/fp16."""
    scale = logit_scale.float()
    return scale * image_rows.float() @ text_cols.float().t(), scale * text_rows.float() @ image_cols.float().t()


def contrastive_loss(image_rows: torch.Tensor, text_rows: torch.Tensor, image_cols: torch.Tensor,
                     text_cols: torch.Tensor, logit_scale: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """Mean over rows i of (CE(image_i -> all texts) + CE(text_i -> all images)) / 2, where the positive
    of row i is column row_offset + i. Features should be L2-normalised."""
    n = image_rows.shape[0]
    if text_rows.shape[0] != n:
        raise ValueError(f"{n} image rows but {text_rows.shape[0]} text rows")
    if image_cols.shape[0] != text_cols.shape[0] or row_offset + n > image_cols.shape[0] or row_offset < 0:
        raise ValueError(f"rows {row_offset}..{row_offset + n} do not fit {image_cols.shape[0]} image / "
                         f"{text_cols.shape[0]} text columns")
    return _both_ways(*clip_logits(image_rows, text_rows, image_cols, text_cols, logit_scale), row_offset)


def _both_ways(logits_i2t: torch.Tensor, logits_t2i: torch.Tensor, row_offset: int) -> torch.Tensor:
    """The mean of the two directions' cross-entropies; row i's positive is column row_offset + i."""
    labels = torch.arange(row_offset, row_offset + logits_i2t.shape[0], device=logits_i2t.device)
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the cross-entropy of the student's row distribution against the teacher's
    (= KL(teacher || student) + the teacher's entropy, a constant: the same gradient as the KL)."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


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

    def _rows_and_cols(self, image_features: torch.Tensor, text_features: torch.Tensor):
        """(image rows, text rows, image columns, text columns, row offset) of this rank's loss."""
        all_images, all_texts = self.gather(image_features), self.gather(text_features)
        n = image_features.shape[0]
        if all_images.shape[0] % n:
            raise ValueError(f"gathered {all_images.shape[0]} rows from ranks with {n} rows here: "
                             "every rank needs the same batch size")
        if self.local_loss:
            return image_features, text_features, all_images, all_texts, self.rank * n
        return all_images, all_texts, all_images, all_texts, 0

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        *rows_and_cols, offset = self._rows_and_cols(image_features, text_features)
        return contrastive_loss(*rows_and_cols, logit_scale, row_offset=offset)


class DistillLoss(ClipLoss):
    """The contrastive loss plus `weight` x the distillation loss: the cross-entropy of the student's
    logits against the teacher's softmax, per row, both directions averaged (open_clip's
    DistillClipLoss, which adds the two with weight 1). The teacher's logits are made from its own
    features and logit scale over the same rows and columns (gathered like the student's; they carry
    no gradient), so teacher and student may differ in widths and embedding size. `parts` keeps the
    last call's two terms for the log."""

    def __init__(self, gather: Callable[[torch.Tensor], torch.Tensor] = _identity, rank: int = 0,
                 local_loss: bool = True, weight: float = 1.0):
        super().__init__(gather, rank, local_loss)
        self.weight = float(weight)
        self.parts = {}

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                teacher_image_features: torch.Tensor, teacher_text_features: torch.Tensor,
                teacher_logit_scale: torch.Tensor) -> torch.Tensor:
        *rows_and_cols, offset = self._rows_and_cols(image_features, text_features)
        i2t, t2i = clip_logits(*rows_and_cols, logit_scale)
        contrastive = _both_ways(i2t, t2i, offset)
        with torch.no_grad():
            *teacher_rows_and_cols, _ = self._rows_and_cols(teacher_image_features, teacher_text_features)
            teacher_i2t, teacher_t2i = clip_logits(*teacher_rows_and_cols, teacher_logit_scale)
        distill = (soft_cross_entropy(teacher_i2t, i2t) + soft_cross_entropy(teacher_t2i, t2i)) / 2
        self.parts = {"contrastive": contrastive.detach(), "distill": distill.detach()}
        return contrastive + self.weight * distill
