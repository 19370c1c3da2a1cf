"""Run by tests/test_unlabeled.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): trains the tiny
model and objective of tests/ddp_worker.py on labeled P x K batches plus unlabeled images
(``UnlabeledBatchSampler``) and saves what each rank ends with to ``OUT/unlabeled-rank<R>.pt``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from distill.data.unlabeled import UNLABELED, UnlabeledBatchSampler
from distill.engine import fit
from tests.ddp_worker import NUM_IDS, SHAPE, TEACHER_DIM, TinyData, build, pk_sampler, settings

EXTRA, PER_STEP = 10, 4  # unlabeled images, and how many join each batch of 6 labeled ones


class WithUnlabeled(TinyData):
    """TinyData's 36 labeled images followed by ``EXTRA`` unlabeled ones (label -1), with teacher outputs."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.num_labeled = len(self.labels)
        self.labels = self.labels + [UNLABELED] * EXTRA
        self.images = torch.cat([self.images, torch.randn(EXTRA, *SHAPE, generator=g, dtype=torch.float64)])
        self.teacher_emb = torch.cat([self.teacher_emb, F.normalize(torch.randn(EXTRA, TEACHER_DIM, generator=g, dtype=torch.float64), dim=1)])
        self.teacher_logits = torch.cat([self.teacher_logits, torch.randn(EXTRA, NUM_IDS, generator=g, dtype=torch.float64)])

    def teacher(self, images: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.teacher_emb[indices], self.teacher_logits[indices]


def sampler(data: WithUnlabeled, rank: int = 0, world: int = 1) -> UnlabeledBatchSampler:
    labeled = pk_sampler(data.labels[: data.num_labeled], rank, world)
    return UnlabeledBatchSampler(labeled, data.num_labeled, EXTRA, PER_STEP, seed=3, rank=rank, world_size=world, fingerprint="tiny")


def main(out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    data = WithUnlabeled()
    model, objective = build()
    fit(model, objective, data, sampler(data, rank, world), settings(False), out / "unlabeled.ckpt", teacher_fn=data.teacher, desc="unlabeled")
    params = {name: p.detach() for name, p in model.named_parameters()}
    torch.save({"model": params, "objective": objective.state_dict()}, out / f"unlabeled-rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
