"""Teacher-output cache: the frozen teacher runs once per data set, not once per epoch.

Outputs for un-augmented training images are stored in one ``.pt`` file keyed by
(teacher fingerprint, data fingerprint, transform). Any change to the weights, the image list
(paths, labels, file sizes) or the transform gives a new key, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from distill.atomic import atomic_torch_save


def cache_key(teacher_fingerprint: str, data_fingerprint: str, transform: object) -> str:
    """The cache file's name for a teacher, an image list (its fingerprint, e.g. ``distill.data.data_fingerprint``)
    and the transform the images go through."""
    parts = f"{teacher_fingerprint}|{data_fingerprint}|{transform!r}"
    return hashlib.sha1(parts.encode()).hexdigest()[:16]


def cached_outputs(
    key: str, cache_dir: str | Path, compute: Callable[[], tuple[Tensor, Tensor | None]]
) -> tuple[tuple[Tensor, Tensor | None], bool]:
    """Load ``(embeddings, logits)`` for ``key`` from ``cache_dir``, or compute and store them atomically.

    Returns the outputs and whether they came from the cache. An unreadable cache file is recomputed.
    """
    path = Path(cache_dir) / f"teacher-{key}.pt"
    if path.exists():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return (data["embeddings"], data.get("logits")), True
        except Exception:  # corrupt or foreign file: recompute and overwrite
            pass
    emb, logits = compute()
    atomic_torch_save({"embeddings": emb, "logits": logits}, path)
    return (emb, logits), False
