"""Unlabeled images (``--unlabeled``): the images, the dataset that joins them to the labeled
training set, and the batch sampler that adds a share of them to every labeled batch.

Unlabeled images carry the label ``UNLABELED`` (-1) through the whole training step, so the
objective can keep its task losses to the labeled rows and apply the distillation terms to all.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from distill.data.base import Sample, data_fingerprint, load_dataset
from distill.data.dataset import ImageDataset, check_images
from distill.errors import DistillError

UNLABELED = -1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def folder_images(root: Path) -> list[str]:
    """Image files anywhere under ``root``, sorted; directory links are followed once (no loops)."""
    found, visited = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        found += [os.path.join(dirpath, n) for n in filenames if n.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def load_unlabeled(spec: str, strict: bool = False, exclude: Sequence[Sample] = ()) -> list[Sample]:
    """The images of ``spec``, labelled ``UNLABELED``: a folder (searched recursively) or a data spec
    (its training images; their labels are ignored). Unreadable images are skipped (``strict``:
    refused). Images that are also in ``exclude`` (the labeled test images) are refused: a student
    that trained on them would be scored on what it has seen."""
    path = Path(spec)
    if path.is_dir():
        paths = folder_images(path)
    elif ":" in spec or spec in ("digits", "synthetic"):
        paths = [s.path for s in load_dataset(spec, strict=strict).train]
    else:
        raise DistillError(f"--unlabeled {spec}: no such folder (or data spec NAME:PATH)")
    samples = check_images([Sample(p, UNLABELED) for p in paths], strict=strict)
    if not samples:
        raise DistillError(f"--unlabeled {spec}: no readable images found")
    tested = {os.path.realpath(s.path) for s in exclude}
    leaked = [s.path for s in samples if os.path.realpath(s.path) in tested]
    if leaked:
        raise DistillError(
            f"--unlabeled {spec} holds {len(leaked)} image(s) of the test set (e.g. {leaked[0]}): leave them out, "
            "the student would be scored on images it trained on"
        )
    return samples


class JointDataset(Dataset):
    """The labeled training images (indices ``0..n-1``) followed by the unlabeled ones, whose label is
    ``UNLABELED``; items are ``(image, label, index in this dataset)`` like ``ImageDataset``'s."""

    def __init__(self, labeled: ImageDataset, unlabeled: Sequence[Sample], transform: Callable) -> None:
        self.labeled = labeled
        self.unlabeled = ImageDataset(unlabeled, transform)
        self.samples = labeled.samples + self.unlabeled.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        n = len(self.labeled)
        if index < n:
            return self.labeled[index]
        return self.unlabeled[index - n][0], UNLABELED, index

    @property
    def labels(self) -> list[int]:
        return self.labeled.labels + [UNLABELED] * len(self.unlabeled)


class UnlabeledBatchSampler(Sampler[list[int]]):
    """Each batch of ``labeled`` (a batch sampler over the first ``offset`` indices; None: no labeled
    data) plus ``batch`` unlabeled indices ``offset..offset+count-1``.

    The unlabeled images are used in reshuffled cycles (each once before any repeats) drawn from
    ``(seed, epoch)`` alone: global step ``g`` takes the ``g``-th slice of the epoch's stream, and
    rank ``r``'s ``j``-th batch is global step ``j * world_size + r``, as the P x K sampler
    numbers them; so one process and ``world_size`` processes see the same images. Without labeled
    data an epoch is one pass over the unlabeled images. ``state_dict`` records the unlabeled
    images' fingerprint, so a checkpoint never resumes with other images.
    """

    def __init__(
        self, labeled: Sampler[list[int]] | None, offset: int, count: int, batch: int, seed: int = 0,
        rank: int = 0, world_size: int = 1, fingerprint: str = "",
    ) -> None:
        if count < 1 or batch < 1:
            raise DistillError(f"unlabeled batches need images and a batch size >= 1, got {count} images, batch {batch}")
        self.labeled, self.offset, self.count, self.batch = labeled, offset, count, batch
        self.seed, self.rank, self.world_size, self.fingerprint = seed, rank, world_size, fingerprint
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.labeled is not None:
            self.labeled.set_epoch(epoch)

    def __len__(self) -> int:
        if self.labeled is not None:
            return len(self.labeled)
        return self.steps_per_pass

    @property
    def steps_per_pass(self) -> int:
        """This process's steps in one pass over the unlabeled images (at least 1)."""
        return max(1, self.count // (self.batch * self.world_size))

    def _stream(self, steps: int) -> np.ndarray:
        """The epoch's unlabeled indices for ``steps`` global steps: reshuffled cycles of all of them."""
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        cycles = max(1, math.ceil(steps * self.batch / self.count))
        return np.concatenate([rng.permutation(self.count) for _ in range(cycles)]) + self.offset

    def __iter__(self) -> Iterator[list[int]]:
        steps = len(self)
        stream = self._stream(steps * self.world_size)
        labeled = iter(self.labeled) if self.labeled is not None else iter([[]] * steps)
        for j, batch in enumerate(labeled):
            g = j * self.world_size + self.rank
            yield list(batch) + stream[g * self.batch : (g + 1) * self.batch].tolist()

    @property
    def observe(self) -> Callable | None:
        """The labeled sampler's ``observe`` fed the labeled rows only (None when it has none)."""
        inner = getattr(self.labeled, "observe", None)
        if inner is None:
            return None

        def observe(indices: Tensor, emb: Tensor, labels: Tensor) -> None:
            keep = labels.cpu() != UNLABELED
            inner(indices[keep], emb[keep.to(emb.device)], labels[keep.to(labels.device)])

        return observe

    def state_dict(self) -> dict:
        inner = self.labeled.state_dict() if hasattr(self.labeled, "state_dict") else None
        return {"unlabeled": self.fingerprint, "labeled": inner}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("unlabeled") != self.fingerprint:
            raise DistillError(
                "the checkpoint was trained with other unlabeled images (or none): give the same --unlabeled, "
                "or drop --resume to start again"
            )
        if state.get("labeled") is not None:
            self.labeled.load_state_dict(state["labeled"])


def unlabeled_fingerprint(samples: Sequence[Sample], batch: int) -> str:
    """What the unlabeled part of a training depends on: the images and how many join each batch."""
    return f"{data_fingerprint(samples)}x{batch}"
