"""Deep Ranking's multi-scale embedding (Wang et al. 2014, Figure 3).

The deep network sees the full image; two shallow paths see it downsampled 4x and 8x and catch
the coarse, global appearance. As in the paper, the three embeddings are each L2-normalised,
concatenated and mapped by one linear embedding layer; the result is L2-normalised again:
``f(x) = normalize(W [e_deep; e_4x; e_8x] + b)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShallowPath(nn.Module):
    """Average-pool the image ``factor`` x, two 3x3 conv+BN+ReLU with a 3x3/2 max pool between,
    global average pool, linear to ``embed_dim`` (L2-normalised)."""

    def __init__(self, factor: int, embed_dim: int, channels: int = 32) -> None:
        super().__init__()
        self.down = nn.AvgPool2d(factor, ceil_mode=True)  # ceil: an image smaller than factor still gives 1x1
        self.convs = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, padding=1),
            nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.proj = nn.Linear(2 * channels, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj(self.convs(self.down(x)).flatten(1)), dim=1)


class MultiScaleNet(nn.Module):
    """Wraps any ``(embedding, logits)`` model with ``embed_dim``/``num_classes`` (student or teacher).

    Returns ``(multi-scale embedding, base logits)``: the classifier stays on the deep path, so
    every parameter takes part in the loss (DDP needs that) and logits keep their meaning for KD.
    """

    def __init__(self, base: nn.Module, factors: tuple[int, int] = (4, 8), channels: int = 32) -> None:
        super().__init__()
        self.base = base
        self.embed_dim = base.embed_dim
        self.num_classes = base.num_classes
        self.paths = nn.ModuleList(ShallowPath(f, self.embed_dim, channels) for f in factors)
        self.combine = nn.Linear((1 + len(factors)) * self.embed_dim, self.embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        deep, logits = self.base(x)
        parts = torch.cat([deep] + [path(x) for path in self.paths], dim=1)
        return F.normalize(self.combine(parts), dim=1), logits
