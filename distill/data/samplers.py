"""Batch samplers (P x K, and Deep Ranking's online importance sampling) and DataLoader settings.

PK sampling (Schroff et al. 2015; Hermans et al. 2017, "In Defense of the Triplet Loss") gives
every anchor in a batch K-1 positives and (P-1)K negatives, which triplet and DarkRank losses need.
Importance sampling (Wang et al. 2014) fills batches with the triplets that are hardest now.
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
from distill.losses.mining import ImportanceTripletSampler, pairwise_sq_dist, positive_negative_masks


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


class ImportanceBatchSampler(Sampler[list[int]]):
    """Batches of hard triplets by Deep Ranking's online importance sampling (Wang et al. 2014, Sec. 5).

    Each epoch streams the shuffled training set through a fresh ``ImportanceTripletSampler``
    (per-class reservoirs of ``capacity`` items, so memory does not grow with the data set). Each
    batch then holds the images of triplets drawn from those buffers: queries in proportion to their
    importance, far positives and near negatives preferred under the current embeddings, triplets
    that already satisfy ``margin`` dropped; when too few violate it, random images fill the batch.

    The engine feeds every trained batch back through ``observe``: it stores the embeddings (the
    distances used to pick positives and negatives) and sets each image's importance to its hardest
    in-batch triplet violation ``max(0, margin + max_p D_ap - min_n D_an)`` plus a small floor, so
    every image can still be drawn. Unseen images start with importance 1 and a zero embedding. With
    DataLoader workers the feedback lags by the few batches they prefetch. An epoch has as many
    batches as a P x K epoch; under DDP each rank samples its own batches (seeded by rank).
    """

    FLOOR = 1e-3

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        margin: float = 0.2,
        capacity: int = 16,
        temperature: float = 0.5,
        num_candidates: int = 32,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        values = torch.as_tensor(list(labels), dtype=torch.long)
        classes, self.labels = torch.unique(values, return_inverse=True)
        if len(classes) < 2 or batch_size < 3:
            raise DistillError(
                f"importance sampling needs at least 2 identities and batches of at least 3 images, "
                f"got {len(classes)} identities and batch size {batch_size}"
            )
        self.num_classes = len(classes)
        self.batch_size, self.margin, self.seed = batch_size, margin, seed
        self.options = {"capacity": capacity, "margin": margin, "temperature": temperature, "num_candidates": num_candidates}
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.importance = torch.ones(len(values), dtype=torch.float64)
        self.table: torch.Tensor | None = None  # [N, D] latest embeddings, allocated on the first observe

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, len(self.labels) // self.batch_size) // self.world_size

    def _embed(self, indices: torch.Tensor) -> torch.Tensor:
        return self.table[indices] if self.table is not None else torch.zeros(len(indices), 1)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)[0]))
        triplets = ImportanceTripletSampler(self.num_classes, generator=generator, **self.options)
        order = torch.randperm(len(self.labels), generator=generator)
        triplets.update(order, self.labels[order], self.importance[order])
        for _ in range(len(self)):
            drawn = triplets.sample(self.batch_size, embed=self._embed).flatten()
            batch = list(dict.fromkeys(drawn.tolist()))[: self.batch_size]  # unique, in draw order
            if len(batch) < self.batch_size:
                rest = torch.randperm(len(self.labels), generator=generator).tolist()
                taken = set(batch)
                batch += [i for i in rest if i not in taken][: self.batch_size - len(batch)]
            yield batch

    def observe(self, indices: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor) -> None:
        """Record a trained batch: its embeddings and each image's hardest triplet violation."""
        indices, emb, labels = indices.cpu().long(), emb.detach().float().cpu(), labels.cpu()
        if self.table is None:
            self.table = torch.zeros(len(self.labels), emb.shape[1])
        d = pairwise_sq_dist(emb)
        pos, neg = positive_negative_masks(labels)
        far_pos = d.masked_fill(~pos, float("-inf")).amax(1)
        near_neg = d.masked_fill(~neg, float("inf")).amin(1)
        violation = (self.margin + far_pos - near_neg).clamp_min(0.0)
        violation = torch.where(pos.any(1) & neg.any(1), violation, torch.zeros_like(violation))
        self.table[indices] = emb
        self.importance[indices] = violation.double() + self.FLOOR

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """Importance scores and stored embeddings, for checkpoints (resume continues bit-for-bit)."""
        return {"importance": self.importance.clone(), "table": None if self.table is None else self.table.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        if state["importance"].shape != self.importance.shape:
            raise DistillError(
                f"sampler state covers {len(state['importance'])} images, this training set has {len(self.importance)}"
            )
        self.importance = state["importance"].clone()
        self.table = None if state["table"] is None else state["table"].clone()


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
