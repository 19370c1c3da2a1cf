"""Mixed images for distillation (``--mix-rows``): "function matching" (Beyer et al. 2022, "Knowledge
distillation: A good teacher is patient and consistent").

A distilled student learns the teacher's function only where it sees it: on the training images.
Each training batch here gets ``n`` more rows, each a pixel mix of two other rows of the batch,

    x_mix = lam * x_i + (1 - lam) * x_j,   lam ~ U(0, 1),  i != j,

taken after augmentation, so the teacher scores exactly the view the student sees. The mixed rows
carry the label ``UNLABELED`` and the index ``MIXED``: the task losses leave them out, the
distillation terms (KD on the teacher's logits, DarkRank, RKD, ...) match the teacher on them as on
unlabeled images. The draws come from torch's global random state (checkpointed with a training).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.data.unlabeled import UNLABELED

MIXED = -1  # the dataset index of a mixed row: it is in no dataset, the teacher must score it live


def with_mixed_rows(images: Tensor, labels: Tensor, indices: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``images``, ``labels`` and ``indices`` with ``n`` mixed rows appended (see the module
    docstring); unchanged when ``n`` is 0."""
    if n <= 0:
        return images, labels, indices
    rows = len(images)
    if rows < 2:
        raise ValueError(f"mixing needs at least 2 rows in a batch, got {rows}")
    first = torch.randint(rows, (n,))
    second = torch.randint(rows - 1, (n,))
    second = second + (second >= first).long()  # any other row, uniformly
    lam = torch.rand(n, dtype=images.dtype).view(n, *[1] * (images.dim() - 1)).to(images.device)
    first, second = first.to(images.device), second.to(images.device)
    mixed = lam * images[first] + (1 - lam) * images[second]
    return (
        torch.cat([images, mixed]),
        torch.cat([labels, torch.full((n,), UNLABELED, dtype=labels.dtype, device=labels.device)]),
        torch.cat([indices, torch.full((n,), MIXED, dtype=indices.dtype, device=indices.device)]),
    )
