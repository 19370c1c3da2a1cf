"""Hinton knowledge distillation (arXiv 1503.02531) and plain embedding regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import DistillError


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Soft-target loss ``T^2 * KL(softmax(t / T) || softmax(s / T))``, mean over the batch.

    The T^2 factor keeps the gradient's scale independent of T (Hinton et al., Sec. 2), so the
    loss weight need not change with the temperature. The teacher side is detached.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise DistillError(
            f"kd_loss needs student and teacher logits [N, C] of the same shape; got "
            f"{list(student_logits.shape)} and {list(teacher_logits.shape)} (do both models have the same classes?)"
        )
    if not temperature > 0:
        raise DistillError(f"KD temperature must be > 0; got {temperature}")
    with torch.autocast(student_logits.device.type, enabled=False):
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        log_ps = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
        log_pt = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
        return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * temperature**2


def embedding_regression(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Mean over the batch of the squared L2 distance ``||s_i - t_i||^2``; teacher side detached."""
    if student_emb.dim() != 2 or student_emb.shape != teacher_emb.shape:
        raise DistillError(
            f"embedding regression needs student and teacher embeddings [N, D] of the same shape; got "
            f"{list(student_emb.shape)} and {list(teacher_emb.shape)} (give the student the teacher's embedding size)"
        )
    with torch.autocast(student_emb.device.type, enabled=False):
        dtype = torch.promote_types(student_emb.dtype, torch.float32)
        return (student_emb.to(dtype) - teacher_emb.detach().to(dtype)).pow(2).sum(1).mean()
