"""Hinton knowledge distillation (arXiv 1503.02531) and plain embedding regression."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.common import check_pair, full_precision
from distill.losses.registry import LossInputs, number, register_loss


@full_precision
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft-target loss ``T^2 * KL(softmax(t / T) || softmax(s / T))``, mean over the batch.

    The T^2 factor keeps the gradient's scale independent of T (Hinton et al., Sec. 2), so the
    loss weight need not change with the temperature. The teacher side is detached.
    """
    check_pair(student_logits, teacher_logits, "kd_loss", what="logits [N, C]", same_shape="do both models have the same classes?")
    if not temperature > 0:
        raise DistillError(f"KD temperature must be > 0; got {temperature}")
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * temperature**2


@full_precision
def embedding_regression(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Mean over the batch of the squared L2 distance ``||s_i - t_i||^2``; teacher side detached."""
    check_pair(
        student_emb, teacher_emb, "embedding regression", same_shape="give the student the teacher's embedding size"
    )
    return (student_emb - teacher_emb.detach()).pow(2).sum(1).mean()


@register_loss(
    "kd", kind="distill", defaults={"kd_temperature": 1.0}, checks={"kd_temperature": number(0.0, strict=True)},
    needs=("teacher_logits",),
)
class KD(nn.Module):
    """Hinton KD: the teacher's softened class probabilities (its logits must be the task's classes)"""

    def __init__(self, kd_temperature: float) -> None:
        super().__init__()
        self.temperature = kd_temperature

    def forward(self, x: LossInputs) -> Tensor:
        return kd_loss(x.logits, x.teacher_logits, self.temperature)
