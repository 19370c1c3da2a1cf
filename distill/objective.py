"""The student's training objective: task losses + w_kd * KD + w_dr * DarkRank + the weighted
embedding-level distillers (RKD distance and angle, PKT, regression, compatibility).

``StudentObjective`` is an ``nn.Module`` so that the learnable parts of the task losses (a
verification head, L-Softmax weights, the HDML generator) and the regression's projection are
optimised and checkpointed with the model. Teacher outputs arrive per batch as
``(teacher_emb, teacher_logits or None)``. Rows labelled -1 are unlabeled images (``--unlabeled``):
the task losses skip them, the distillation terms use every row. ``build_objective`` is the one place that turns a
``Config`` into an objective.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from distill.config import Config
from distill.errors import DistillError
from distill.losses.darkrank import DarkRankLoss
from distill.losses.kd import kd_loss
from distill.losses.relational import EmbeddingRegression, compatibility_loss, pkt_loss, rkd_angle_loss, rkd_distance_loss
from distill.losses.task import build_task_loss

# embedding-level terms, in the order they are added and logged
EMBEDDING_TERMS = ("rkd_distance", "rkd_angle", "pkt", "regression", "compat")
_PAIR_LOSSES = {"rkd_distance": rkd_distance_loss, "rkd_angle": rkd_angle_loss, "pkt": pkt_loss}


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
        embedding_weights: dict[str, float] | None = None,
        teacher_embed_dim: int | None = None,
    ) -> None:
        """``embedding_weights`` maps names of ``EMBEDDING_TERMS`` to weights (0 or missing = off);
        ``teacher_embed_dim`` (default ``embed_dim``) sizes the regression's projection."""
        super().__init__()
        self.task = build_task_loss(task_spec, embed_dim, num_classes, **(loss_options or {}))
        if kd_weight and not teacher_has_logits:
            warnings.warn("the teacher has no classifier logits (an embedding-only ONNX model?): KD is disabled", stacklevel=2)
            kd_weight = 0.0
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature
        self.darkrank = darkrank if darkrank_weight else None
        self.darkrank_weight = darkrank_weight
        weights = {k: v for k, v in (embedding_weights or {}).items() if v}
        unknown = sorted(set(weights) - set(EMBEDDING_TERMS))
        if unknown:
            raise DistillError(f"unknown distillation term(s) {', '.join(unknown)}; valid: {', '.join(EMBEDDING_TERMS)}")
        self.embedding_weights = {k: weights[k] for k in EMBEDDING_TERMS if k in weights}
        teacher_dim = teacher_embed_dim or embed_dim
        if "compat" in weights and teacher_dim != embed_dim:
            raise DistillError(
                f"the compat loss puts the student in the teacher's embedding space, so the student's embed_dim "
                f"must be the teacher's: got {embed_dim} and {teacher_dim} (set --embed-dim {teacher_dim})"
            )
        self.regression = EmbeddingRegression(embed_dim, teacher_dim) if "regression" in weights else None

    def forward(
        self, emb: Tensor, logits: Tensor, labels: Tensor, teacher_out: tuple[Tensor, Tensor | None] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        t_emb, t_logits = teacher_out if teacher_out is not None else (None, None)
        loss, parts = self._task(emb, logits, labels, t_emb)
        if self.kd_weight and t_logits is not None:
            kd = kd_loss(logits, t_logits, self.kd_temperature)
            loss = loss + self.kd_weight * kd
            parts["kd"] = kd.item()
        if self.darkrank is not None and t_emb is not None:
            dr = self.darkrank(emb, t_emb)
            loss = loss + self.darkrank_weight * dr
            parts["darkrank"] = dr.item()
        if t_emb is not None:
            for name, weight in self.embedding_weights.items():
                value = self._embedding_term(name, emb, t_emb, labels)
                loss = loss + weight * value
                parts[name] = value.item()
        return loss, parts

    def _task(self, emb: Tensor, logits: Tensor, labels: Tensor, t_emb: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        """The task losses of the labeled rows (label >= 0); unlabeled rows (-1) only take part in the
        distillation terms. A batch without labeled rows has no task loss."""
        labeled = labels >= 0
        if bool(labeled.all()):
            return self.task(emb, logits, labels, teacher_emb=t_emb)
        if not bool(labeled.any()):
            return emb.sum() * 0.0, {}
        return self.task(emb[labeled], logits[labeled], labels[labeled], teacher_emb=None if t_emb is None else t_emb[labeled])

    def _embedding_term(self, name: str, emb: Tensor, t_emb: Tensor, labels: Tensor) -> Tensor:
        if name == "regression":
            return self.regression(emb, t_emb)
        if name == "compat":  # an unlabeled image's one positive is its own teacher embedding
            own = -1 - torch.arange(len(labels), device=labels.device)
            return compatibility_loss(emb, t_emb, torch.where(labels >= 0, labels, own))
        return _PAIR_LOSSES[name](emb, t_emb)


def build_objective(cfg: Config, num_classes: int, teacher: Any = None) -> StudentObjective:
    """The objective of a run: the task losses alone without a teacher (the baseline student, or the
    teacher itself), plus KD, DarkRank and the embedding-level terms with the config's weights when a
    ``teacher`` is given (its ``embed_dim`` sizes the regression's projection; KD needs its
    ``has_logits``)."""
    if teacher is None:
        return StudentObjective(cfg.loss, cfg.embed_dim, num_classes, loss_options=cfg.loss_options)
    darkrank = None
    if cfg.darkrank != "none":
        darkrank = DarkRankLoss(
            cfg.darkrank_alpha, cfg.darkrank_beta, mode=cfg.darkrank, list_size=cfg.darkrank_list_size,
            method=cfg.darkrank_method, num_samples=cfg.darkrank_samples, topk=cfg.darkrank_topk,
        )
    return StudentObjective(
        cfg.loss,
        cfg.embed_dim,
        num_classes,
        kd_weight=cfg.kd_weight,
        kd_temperature=cfg.kd_temperature,
        darkrank=darkrank,
        darkrank_weight=cfg.darkrank_weight,
        teacher_has_logits=teacher.has_logits,
        loss_options=cfg.loss_options,
        embedding_weights={name: getattr(cfg, f"{name}_weight") for name in EMBEDDING_TERMS},
        teacher_embed_dim=teacher.embed_dim,
    )
