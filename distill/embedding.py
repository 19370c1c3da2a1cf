"""The one output contract every teacher and student follows: ``(embedding, logits)``.

A backbone maps images ``[N, 3, H, W]`` to a feature map ``[N, C, h, w]``; ``EmbeddingNet`` pools it,
projects it to ``embed_dim`` (Linear + BatchNorm, the usual re-ID "BNNeck"), returns the
L2-normalised embedding for retrieval and the classifier logits for the softmax task loss.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class EmbeddingNet(nn.Module):
    """backbone -> global average pool -> Linear -> BatchNorm1d -> (L2-normalised embedding, logits).

    ``logits`` come from the un-normalised projection so the classifier is free to scale them.
    ``forward`` always returns the pair (``EmbeddingOnly`` keeps the embedding, what ONNX exports).
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(feat_dim, embed_dim)
        self.bn = nn.BatchNorm1d(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone features ``[N, feat_dim]``."""
        return self.pool(self.backbone(x)).flatten(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.bn(self.proj(self.features(x)))
        return F.normalize(z, dim=1), self.classifier(z)


class EmbeddingOnly(nn.Module):
    """Wraps a model so that it returns only the embedding (for ONNX export and benchmarks)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[0]
