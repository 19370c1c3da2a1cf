"""Student API on top of ``distill.models``: ``@register_student(name)`` builders, ``create_student``.

A builder takes ``(embed_dim, num_classes, width=1.0)`` and returns a model whose ``forward``
gives ``(L2-normalised embedding, logits)`` and which has ``embed_dim``/``num_classes`` attributes
(an ``EmbeddingNet`` does). A student is a registered name or ``timm:NAME``; ``create_student``
optionally adds Deep Ranking's multi-scale paths.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from distill.models.registry import ModelBuilder, ModelCfg, build_model, model_names, register_model
from distill.multiscale import MultiScaleNet


def register_student(name: str, cfg: ModelCfg | None = None) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: make ``builder(embed_dim, num_classes, width=1.0)`` available as student ``name``."""
    return register_model(name, "student", cfg)


def student_names() -> list[str]:
    return model_names("student")


def create_student(name: str, embed_dim: int, num_classes: int, width: float = 1.0, multiscale: bool = False) -> nn.Module:
    """Build student ``name`` (registered, or ``timm:NAME``), optionally wrapped in ``MultiScaleNet``."""
    model = build_model(name, embed_dim, num_classes, width=width, role="student")
    return MultiScaleNet(model) if multiscale else model
