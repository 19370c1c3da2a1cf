"""Data-set records and the loader registry: ``load_dataset("market1501:/data/Market-1501")``.

Every loader returns ``Splits`` of plain ``Sample`` records; images are read later, by
``distill.data.dataset.ImageDataset``. Labels are the data set's own ids (not remapped).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

from distill.errors import DistillError


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    camera: int = -1


@dataclass
class Splits:
    """A data set split by identity: train ids are disjoint from query/gallery ids.

    ``protocol`` is ``"reid"`` (mAP/CMC with the same-camera filter, query vs gallery) or
    ``"retrieval"`` (Recall@K/NMI/F1; query and gallery are both the test list, camera -1).
    """

    name: str
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    protocol: str = "retrieval"
    info: dict = field(default_factory=dict)

    @property
    def num_train_classes(self) -> int:
        return len({s.label for s in self.train})


Loader = Callable[..., Splits]
_LOADERS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Register ``fn(path: str | None, **options) -> Splits`` under ``name``."""

    def wrap(fn: Loader) -> Loader:
        _LOADERS[name] = fn
        return fn

    return wrap


def dataset_names() -> list[str]:
    return sorted(_LOADERS)


def load_dataset(spec: str, **options) -> Splits:
    """Load ``NAME`` or ``NAME:PATH`` (e.g. ``synthetic``, ``market1501:/data/Market-1501``)."""
    name, _, path = spec.partition(":")
    if name not in _LOADERS:
        raise DistillError(f"unknown data set '{name}'; known: {', '.join(dataset_names())} (use NAME:PATH)")
    return _LOADERS[name](path or None, **options)


MIN_VAL_IDS, MIN_TRAIN_IDS = 2, 3  # 3 left to train: digits (5 classes) keeps a validation split


def hold_out_identities(samples: list[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Split training samples by identity into ``(train, validation)``.

    ``round(fraction * ids)`` identities (at least ``MIN_VAL_IDS``), evenly spread over the sorted
    labels, are held out: deterministic, the same for every seed so that seeds compare on the same
    data. Validation is off (empty) for ``fraction == 0`` or when fewer than ``MIN_TRAIN_IDS``
    identities would be left to train on.
    """
    labels = sorted({s.label for s in samples})
    n_val = max(MIN_VAL_IDS, round(fraction * len(labels))) if fraction > 0 else 0
    if n_val == 0 or len(labels) - n_val < MIN_TRAIN_IDS:
        if fraction > 0:
            warnings.warn(
                f"validation is off: {len(labels)} training identities are too few to hold out {n_val} "
                f"and keep {MIN_TRAIN_IDS} to train on (no best checkpoint, no teacher gate)",
                stacklevel=2,
            )
        return list(samples), []
    held = {labels[int((j + 0.5) * len(labels) / n_val)] for j in range(n_val)}
    return [s for s in samples if s.label not in held], [s for s in samples if s.label in held]


def data_fingerprint(samples: Sequence[Sample]) -> str:
    """Hash of every sample's path, label and file size: cheap, and changes when the data does."""
    h = hashlib.sha1()
    for s in samples:
        size = os.path.getsize(s.path) if os.path.exists(s.path) else -1
        h.update(f"{s.path}\0{s.label}\0{size}\n".encode())
    return h.hexdigest()[:16]
