"""Losses: pure functions and modules of tensors (they import no model, data or engine code).

Every module of this package is imported here, so the losses it registers
(:func:`distill.losses.registry.register_loss`) are known as soon as any of them is: adding a loss
is one new file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from distill.losses.darkrank import DarkRankLoss, darkrank_scores, hard_darkrank, soft_darkrank  # noqa: E402
from distill.losses.kd import embedding_regression, kd_loss  # noqa: E402
from distill.losses.registry import entries, register_loss  # noqa: E402
from distill.losses.relational import (  # noqa: E402
    EmbeddingRegression,
    compatibility_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
)
from distill.losses.task import TaskLoss, build_task_loss, task_loss_names  # noqa: E402

__all__ = [
    "DarkRankLoss",
    "EmbeddingRegression",
    "TaskLoss",
    "build_task_loss",
    "compatibility_loss",
    "darkrank_scores",
    "embedding_regression",
    "entries",
    "hard_darkrank",
    "kd_loss",
    "pkt_loss",
    "register_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "soft_darkrank",
    "task_loss_names",
]
