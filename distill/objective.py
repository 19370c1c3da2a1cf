"""The student's training objective: the task losses (``--loss softmax=1,triplet=1``) plus the
distillation terms (``--distill kd=3,darkrank=0.02``), both weighted sums of the losses registered in
:mod:`distill.losses.registry`.

``StudentObjective`` is an ``nn.Module`` so that the learnable parts of the losses (a verification
head, L-Softmax weights, the HDML generator, the regression's projection) are optimised and
checkpointed with the model. Teacher outputs arrive per batch as ``(teacher_emb, teacher_logits or
None)``. Rows labelled -1 are unlabeled images (``--unlabeled``): the task losses skip them, the
distillation terms use every row. ``build_objective`` is the one place that turns a ``Config`` into
an objective, and ``unusable_logits`` the one rule for when a teacher's logits cannot be used.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn

from distill.config import Config
from distill.losses.registry import LossInputs, WeightedSum, check_params, entries, floats, hyperparameters, parse_spec
from distill.losses.task import build_task_loss


class StudentObjective(nn.Module):
    def __init__(
        self,
        task_spec: str,
        embed_dim: int,
        num_classes: int,
        distill: str = "none",
        loss_options: dict[str, Any] | None = None,
        distill_options: dict[str, Any] | None = None,
        teacher_embed_dim: int | None = None,
        logits_unusable: str | None = None,
        scaled: bool = False,
    ) -> None:
        """``distill`` is a ``--distill`` spec (terms with a weight of 0 are left out);
        ``distill_options`` their hyper-parameters (defaults: the registry's);
        ``teacher_embed_dim`` (default ``embed_dim``) sizes the regression's projection;
        ``logits_unusable`` says why the teacher's logits cannot be used (None: they can), which
        turns the terms that need them off, saying so once; ``scaled``: the weights are ratios to the
        task loss's gradient, turned into factors by ``distill.balance`` before training."""
        super().__init__()
        self.task = build_task_loss(task_spec, embed_dim, num_classes, **(loss_options or {}))
        terms = [(name, weight) for name, weight in parse_spec(distill, "distill") if weight]
        params = check_params("distill", distill_options or {})
        if logits_unusable:
            blind = [name for name, _ in terms if "teacher_logits" in entries("distill")[name].needs]
            if blind:
                warnings.warn(
                    f"{logits_unusable}: {', '.join(blind)} {'is' if len(blind) == 1 else 'are'} off "
                    "(the embedding-level terms still apply)", stacklevel=2,
                )
            terms = [t for t in terms if t[0] not in blind]
        self.distill = WeightedSum("distill", terms, params, scaled=scaled, embed_dim=embed_dim,
                                   teacher_dim=teacher_embed_dim or embed_dim)

    def forward(
        self, emb: Tensor, logits: Tensor, labels: Tensor, teacher_out: tuple[Tensor, Tensor | None] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        t_emb, t_logits = teacher_out if teacher_out is not None else (None, None)
        loss, parts = self.task_of_labeled(emb, logits, labels, t_emb)
        if self.distill.terms:  # added one by one onto the task total
            loss, distilled, _ = self.distill.add_to(LossInputs(emb, logits, labels, t_emb, t_logits), loss)
            parts |= floats(distilled)
        return loss, parts

    def task_of_labeled(self, emb: Tensor, logits: Tensor, labels: Tensor, t_emb: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        """The task losses of the labeled rows (label >= 0); unlabeled rows (-1) only take part in the
        distillation terms. A batch without labeled rows has no task loss."""
        labeled = labels >= 0
        if bool(labeled.all()):
            return self.task(emb, logits, labels, teacher_emb=t_emb)
        if not bool(labeled.any()):
            return emb.sum() * 0.0, {}
        return self.task(emb[labeled], logits[labeled], labels[labeled], teacher_emb=None if t_emb is None else t_emb[labeled])


def unusable_logits(teacher: Any, num_classes: int) -> str | None:
    """Why the teacher's logits cannot teach a task of ``num_classes`` classes (0: no labeled data, the
    student takes the teacher's classes), or None when they can."""
    classes = getattr(teacher, "num_classes", None)
    if num_classes and classes is not None and classes != num_classes:
        return f"the teacher has {classes} classes, the task {num_classes}"
    if not teacher.has_logits:
        return "the teacher has no classifier logits"
    return None


def distillation_fields() -> tuple[str, ...]:
    """The Config fields that shape the distillation terms: ``distill``, how its weights are read, the
    mixed images they see and the terms' hyper-parameters."""
    return ("distill", "distill_scale", "mix_rows", *hyperparameters("distill"))


def build_objective(cfg: Config, num_classes: int, teacher: Any = None) -> StudentObjective:
    """The objective of a run: the task losses alone without a teacher (the baseline student, or the
    teacher itself), plus the ``--distill`` terms with the config's hyper-parameters when a ``teacher``
    is given (its ``embed_dim`` sizes the regression's projection; its logits teach KD when
    ``unusable_logits`` finds nothing against them)."""
    if teacher is None:
        return StudentObjective(cfg.loss, cfg.embed_dim, num_classes, loss_options=cfg.loss_options)
    return StudentObjective(
        cfg.loss,
        cfg.embed_dim,
        num_classes,
        distill=cfg.distill,
        loss_options=cfg.loss_options,
        distill_options={k: getattr(cfg, k) for k in hyperparameters("distill") if hasattr(cfg, k)},
        teacher_embed_dim=teacher.embed_dim,
        logits_unusable=unusable_logits(teacher, num_classes),
        scaled=cfg.distill_scale == "gradient",
    )
