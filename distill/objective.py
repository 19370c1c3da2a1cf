"""The student's training objective: task losses + w_kd * KD + w_dr * DarkRank.

``StudentObjective`` is an ``nn.Module`` so that the learnable parts of the task losses (a
verification head, L-Softmax weights, the HDML generator) are optimised and checkpointed with the
model. Teacher outputs arrive per batch as ``(teacher_emb, teacher_logits or None)``.
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from distill.losses.darkrank import DarkRankLoss
from distill.losses.kd import kd_loss
from distill.losses.task import build_task_loss


class StudentObjective(nn.Module):
    def __init__(
        self,
        task_spec: str,
        embed_dim: int,
        num_classes: int,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
        darkrank: DarkRankLoss | None = None,
        darkrank_weight: float = 0.0,
        teacher_has_logits: bool = True,
        loss_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.task = build_task_loss(task_spec, embed_dim, num_classes, **(loss_options or {}))
        if kd_weight and not teacher_has_logits:
            warnings.warn("the teacher has no classifier logits (an embedding-only ONNX model?): KD is disabled", stacklevel=2)
            kd_weight = 0.0
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature
        self.darkrank = darkrank if darkrank_weight else None
        self.darkrank_weight = darkrank_weight

    def forward(
        self, emb: Tensor, logits: Tensor, labels: Tensor, teacher_out: tuple[Tensor, Tensor | None] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        t_emb, t_logits = teacher_out if teacher_out is not None else (None, None)
        loss, parts = self.task(emb, logits, labels, teacher_emb=t_emb)
        if self.kd_weight and t_logits is not None:
            kd = kd_loss(logits, t_logits, self.kd_temperature)
            loss = loss + self.kd_weight * kd
            parts["kd"] = kd.item()
        if self.darkrank is not None and t_emb is not None:
            dr = self.darkrank(emb, t_emb)
            loss = loss + self.darkrank_weight * dr
            parts["darkrank"] = dr.item()
        return loss, parts
