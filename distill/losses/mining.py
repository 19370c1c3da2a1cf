"""Which tuples a metric loss sees: dense distance matrices and triplet masks.

Everything here is vectorised (no Python loop over the batch) and uses squared Euclidean
distances, the distance of Deep Ranking's triplet loss.
"""

from __future__ import annotations

import torch
from torch import Tensor



def pairwise_sq_dist(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Dense squared Euclidean distances ``D2 = x~ 1' + 1 y~' - 2 X Y'`` (``x~`` = squared row norms),
    clamped at 0 against round-off. ``y`` defaults to ``x``."""
    y = x if y is None else y
    d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * x @ y.T
    return d2.clamp_min(0.0)


def positive_negative_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``pos[i, j]``: same label and ``i != j``; ``neg[i, j]``: different label."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def dense_triplet_mask(target_dist: Tensor) -> Tensor:
    """Dense triplet mining on continuous labels (Kim et al. 2019): ``[N, N, N]`` mask of all
    ``(a, i, j)`` with ``i != a``, ``j != a`` and ``D(y_a, y_i) < D(y_a, y_j)`` (which implies ``i != j``;
    ties in label distance are not ranked, so they are left out).
    """
    n = target_dist.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=target_dist.device)
    closer = target_dist.unsqueeze(2) < target_dist.unsqueeze(1)
    return closer & ~eye.unsqueeze(2) & ~eye.unsqueeze(1)
