"""The engine-facing task loss: a weighted sum of the registered task losses, chosen by a spec string.

    task = build_task_loss("softmax=1,triplet=1,lifted=0.5", embed_dim=128, num_classes=751)
    total, parts = task(emb, logits, labels)            # parts: {"softmax": 2.3, "triplet": 0.1, ...}
    optimizer = torch.optim.AdamW([*model.parameters(), *task.parameters()])

Each loss is a class registered in :mod:`distill.losses.registry` (``task.losses[name]``); learnable
parts (verification head, L-Softmax weights, HDML generator and classifier) are submodules, so
``task.parameters()`` is optimised with the model and ``task.state_dict()`` goes into checkpoints
(it also holds HDML's running means).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.common import check_labels, full_precision
from distill.losses.metric import l2_weight_penalty
from distill.losses.registry import LossInputs, WeightedSum, check_params, entries, floats, hyperparameters, number, parse_spec

# the task loss's own hyper-parameter: Deep Ranking's lambda (0.001 in the paper), per step divided by the T terms of the mean
OWN_HPARAMS: dict[str, Any] = {"weight_l2": 0.0}
_OWN_CHECKS = {"weight_l2": number(0.0)}


def __getattr__(name: str) -> Any:
    """``HPARAMS``: every task-loss hyper-parameter with its default (``--loss-opt KEY=VALUE``), read
    from the registry when asked, so that it includes losses registered after this module."""
    if name == "HPARAMS":
        return hyperparameters("task") | OWN_HPARAMS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def task_loss_names() -> list[str]:
    """Loss names accepted in a ``--loss`` spec."""
    return list(entries("task"))


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """``"softmax=1,triplet=1,lifted=0.5"`` -> ``[("softmax", 1.0), ...]``; a bare name weighs 1."""
    return parse_spec(spec, "task")


class TaskLoss(WeightedSum):
    """Weighted sum of task losses. ``forward(emb, logits, labels, teacher_emb=None)`` returns the total
    and each loss's unweighted value (HDML adds its parts as ``"hdml-triplet.lambda"`` etc.)."""

    def __init__(self, terms: list[tuple[str, float]], embed_dim: int, num_classes: int, hparams: dict[str, Any]) -> None:
        super().__init__("task", terms, hparams, embed_dim=embed_dim, num_classes=num_classes)
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.hparams = hparams
        self.mean_terms: Tensor | int = 1  # T of the last forward's mean-reduced loss (weight_penalty divides by it)

    def _check(self, emb: Tensor, logits: Tensor, labels: Tensor, teacher_emb: Tensor | None) -> None:
        check_labels(emb, labels)
        if emb.shape[1] != self.embed_dim:
            raise DistillError(
                f"embedding width {emb.shape[1]} does not match the task loss's embed_dim {self.embed_dim}"
            )
        if logits.shape != (len(labels), self.num_classes):
            raise DistillError(
                f"logits must be [N, num_classes] = [{len(labels)}, {self.num_classes}], got {tuple(logits.shape)}"
            )
        lo, hi = torch.stack([labels.min(), labels.max()]).tolist() if len(labels) else (0, 0)
        if lo < 0 or hi >= self.num_classes:
            raise DistillError(
                f"labels must be class indices 0..{self.num_classes - 1}, got {lo}..{hi}; remap them first"
            )
        for name, _ in self.terms:
            if "teacher_emb" not in self.needs[name]:
                continue
            if teacher_emb is None:
                raise DistillError(
                    f"the {name} loss needs a teacher: its targets are the teacher's embeddings; "
                    f"pass teacher_emb or drop {name} from --loss"
                )
            if teacher_emb.dim() != 2 or len(teacher_emb) != len(labels):
                raise DistillError(
                    f"teacher_emb must be [N, d] with N = {len(labels)}, got {tuple(teacher_emb.shape)}"
                )

    @full_precision
    def forward(
        self, emb: Tensor, logits: Tensor, labels: Tensor, teacher_emb: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        self._check(emb, logits, labels, teacher_emb)
        total, parts, count = self.add_to(LossInputs(emb, logits, labels, teacher_emb), emb.new_zeros(()))
        self.mean_terms = len(labels) if count is None else count
        return total, floats(parts)

    def weight_penalty(self, model: nn.Module) -> Tensor:
        """Deep Ranking's ``lambda ||W||^2`` over the model's (and this module's) weight matrices,
        ``lambda = weight_l2``, added to every training step when ``weight_l2 > 0``.

        The paper minimises ``sum_triplets hinge + lambda ||W||^2``; this loss takes the *mean* over
        the T triplets of the batch, so the penalty is divided by T to keep the paper's balance
        (``mean + lambda / T ||W||^2 = (sum + lambda ||W||^2) / T``). T is counted in the last forward:
        the triplet term's triplets (as mined), or the batch size when there is no triplet term.
        """
        terms = torch.as_tensor(self.mean_terms).clamp_min(1)
        return l2_weight_penalty([*model.parameters(), *self.parameters()], self.hparams["weight_l2"]) / terms


def check_task_loss(spec: str, hparams: dict[str, Any]) -> tuple[list[tuple[str, float]], dict[str, Any]]:
    """``(terms, hyper-parameters with defaults)`` of a ``--loss`` spec and ``--loss-opt`` values, each
    checked: called when the config is read, so a bad value fails before any training."""
    terms = parse_loss_spec(spec)
    return terms, check_params("task", hparams, OWN_HPARAMS, _OWN_CHECKS)


def build_task_loss(spec: str, embed_dim: int, num_classes: int, **hparams: Any) -> TaskLoss:
    """Parse ``spec`` (``--loss``), check ``hparams`` against ``HPARAMS`` and build the ``TaskLoss``."""
    terms, hp = check_task_loss(spec, hparams)
    if embed_dim < 1 or num_classes < 1:
        raise DistillError(f"embed_dim and num_classes must be positive, got {embed_dim} and {num_classes}")
    return TaskLoss(terms, embed_dim, num_classes, hp)
