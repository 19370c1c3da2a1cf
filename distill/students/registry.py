"""Student registry: ``@register_student(name)`` builders and any timm backbone as ``timm:NAME``.

A builder takes ``(embed_dim, num_classes, width=1.0)`` and returns a model whose ``forward``
gives ``(L2-normalised embedding, logits)`` and which has ``embed_dim``/``num_classes`` attributes
(an ``EmbeddingNet`` does). ``create_student`` optionally adds Deep Ranking's multi-scale paths.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from distill.embedding import EmbeddingNet
from distill.errors import DistillError

StudentBuilder = Callable[..., nn.Module]
_STUDENTS: dict[str, StudentBuilder] = {}


def register_student(name: str) -> Callable[[StudentBuilder], StudentBuilder]:
    """Decorator: make ``builder(embed_dim, num_classes, width=1.0)`` available as student ``name``."""

    def register(builder: StudentBuilder) -> StudentBuilder:
        if name in _STUDENTS or ":" in name:
            raise ValueError(f"student name '{name}' is already registered or contains ':'")
        _STUDENTS[name] = builder
        return builder

    return register


def student_names() -> list[str]:
    return sorted(_STUDENTS)


class LibraryBackbone(nn.Module):
    """A timm/torchvision network cut before its pooling and classifier: ``[N, 3, H, W] -> [N, C, h, w]``.

    ``body`` keeps the library's parameter names, so ImageNet state dicts load into it directly;
    ``head_prefixes`` names the library's classifier modules that such files carry and we dropped.
    """

    def __init__(self, body: nn.Module, head_prefixes: tuple[str, ...], output_key: str | None = None) -> None:
        super().__init__()
        self.body = body
        self.head_prefixes = head_prefixes
        self.output_key = output_key

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return out[self.output_key] if self.output_key is not None else out

    @torch.no_grad()
    def feature_dim(self, name: str) -> int:
        """Channels of the feature map, from one forward pass on a 64x64 image (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            out = self(torch.zeros(1, 3, 64, 64))
        except Exception as err:
            raise DistillError(f"'{name}' cannot run on a 64x64 image ({err}); pick a convolutional model") from None
        finally:
            self.train(was_training)
        if not isinstance(out, Tensor) or out.dim() != 4:
            raise DistillError(f"'{name}' gives no [N, C, H, W] feature map; pick a convolutional model")
        return out.shape[1]


def timm_model(name: str, embed_dim: int, num_classes: int) -> EmbeddingNet:
    """``timm:NAME``: timm's network without classifier and pooling (never downloads) + embedding head."""
    import timm

    if not name or not timm.is_model(name):
        raise DistillError(f"unknown timm model '{name}' (see timm.list_models())")
    body = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    classifier = getattr(body, "pretrained_cfg", {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    backbone = LibraryBackbone(body, tuple(c + "." for c in classifier))
    return EmbeddingNet(backbone, backbone.feature_dim(f"timm:{name}"), embed_dim, num_classes)


def create_student(name: str, embed_dim: int, num_classes: int, width: float = 1.0, multiscale: bool = False) -> nn.Module:
    """Build student ``name`` (registered, or ``timm:NAME``), optionally wrapped in ``MultiScaleNet``."""
    from distill.multiscale import MultiScaleNet

    if not width > 0:
        raise DistillError(f"student width must be positive, got {width}")
    if name.startswith("timm:"):
        if width != 1.0:
            raise DistillError(f"--student-width applies to registered students only; '{name}' takes its size from the timm name")
        model = timm_model(name[len("timm:"):], embed_dim, num_classes)
    elif name in _STUDENTS:
        model = _STUDENTS[name](embed_dim, num_classes, width=width)
    else:
        raise DistillError(f"unknown student '{name}'; known: {', '.join(student_names() + ['timm:<name>'])}")
    return MultiScaleNet(model) if multiscale else model
