"""Losses: pure functions and modules of tensors (they import no model, data or engine code)."""

from distill.losses.darkrank import DarkRankLoss, darkrank_scores, hard_darkrank, soft_darkrank
from distill.losses.kd import embedding_regression, kd_loss
from distill.losses.relational import (
    EmbeddingRegression,
    compatibility_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
)
from distill.losses.task import TaskLoss, build_task_loss, task_loss_names

__all__ = [
    "DarkRankLoss",
    "EmbeddingRegression",
    "TaskLoss",
    "build_task_loss",
    "compatibility_loss",
    "darkrank_scores",
    "embedding_regression",
    "hard_darkrank",
    "kd_loss",
    "pkt_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "soft_darkrank",
    "task_loss_names",
]
