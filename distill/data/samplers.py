"""P x K batch sampling and DataLoader settings (importance sampling: :mod:`distill.data.importance`).

PK sampling (Schroff et al. 2015; Hermans et al. 2017, "In Defense of the Triplet Loss") gives
every anchor in a batch K-1 positives and (P-1)K negatives, which triplet and DarkRank losses need.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from distill.errors import DistillError


class PKSampler(Sampler[list[int]]):
    """Batch sampler: each batch holds ``p`` distinct identities x ``k`` of their images.

    Identities are drawn uniformly without replacement within a batch. Each identity's images are
    used in a reshuffled cycle, so its K images in a batch are distinct and all of them are used
    before any repeats; an identity with fewer than K images contributes all of them plus repeats
    drawn with replacement. An epoch has ``len(labels) // (p * k)`` full batches (at least one
    when there are ``p`` identities), so about one pass over the images, always the same number;
    with ``drop_last=False`` a last, smaller batch of ``ceil(rest / k)`` identities covers the rest.
    Fewer than ``p`` identities give no batches (``len == 0``).

    The batches depend only on ``(seed, epoch)``: call ``set_epoch`` each epoch. Under DDP every
    rank builds the same list and takes every ``world_size``-th batch from ``rank``; each rank gets
    the same number of batches (truncated with ``drop_last``, else padded by wrapping around).
    """

    def __init__(
        self,
        labels: Sequence[int],
        p: int,
        k: int,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if p < 1 or k < 1:
            raise DistillError(f"PK sampling needs p >= 1 identities and k >= 1 images per identity, got p={p}, k={k}")
        if not 0 <= rank < world_size:
            raise DistillError(f"rank {rank} is outside 0..{world_size - 1}")
        by_label: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            by_label[int(label)].append(index)
        self.groups = [np.asarray(by_label[label]) for label in sorted(by_label)]
        self.num_samples = len(labels)
        self.p, self.k, self.seed, self.drop_last = p, k, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batch_sizes(self) -> list[int]:
        """Identities per batch over the whole epoch (all ranks)."""
        if len(self.groups) < self.p:
            return []
        full = max(1, self.num_samples // (self.p * self.k))
        rest = self.num_samples - full * self.p * self.k
        return [self.p] * full + ([math.ceil(rest / self.k)] if rest > 0 and not self.drop_last else [])

    def _per_rank(self, total: int) -> int:
        return total // self.world_size if self.drop_last else math.ceil(total / self.world_size)

    def __len__(self) -> int:
        return self._per_rank(len(self._batch_sizes()))

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        cycles = [rng.permutation(g) for g in self.groups]
        used = [0] * len(self.groups)
        batches = []
        for size in self._batch_sizes():
            batch = []
            for g in rng.choice(len(self.groups), size=size, replace=False):
                images = self.groups[g]
                if len(images) < self.k:
                    batch += rng.permutation(images).tolist() + rng.choice(images, self.k - len(images)).tolist()
                    continue
                if used[g] + self.k > len(images):
                    cycles[g], used[g] = rng.permutation(images), 0
                batch += cycles[g][used[g] : used[g] + self.k].tolist()
                used[g] += self.k
            batches.append(batch)
        count = self._per_rank(len(batches))
        if batches:
            batches = (batches * math.ceil(count * self.world_size / len(batches)))[: count * self.world_size]
        yield from batches[self.rank :: self.world_size]


def cpu_count() -> int:
    """CPU cores this process may use (respects affinity masks, e.g. under Slurm or taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_settings(device: torch.device | str, workers: int | None = None) -> dict:
    """DataLoader keyword arguments for ``device``: ``num_workers``, ``pin_memory``, ``persistent_workers``.

    Rule for ``workers=None``: the cores are shared by the ``LOCAL_WORLD_SIZE`` processes on this
    node. On a GPU the CPU only decodes images, so use all cores but one, at most 8. On the CPU the
    model itself needs the cores, so decode in the main process up to 4 cores and use half of
    them (at most 4) above that. Memory is pinned only for CUDA; workers persist across epochs.
    """
    device = torch.device(device)
    cores = max(1, cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if workers is None:
        if device.type == "cuda":
            workers = min(8, cores - 1)
        else:
            workers = 0 if cores <= 4 else min(4, cores // 2)
    if workers < 0:
        raise DistillError(f"--workers must be >= 0, got {workers}")
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}
