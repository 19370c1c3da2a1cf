"""Run by tests/test_ddp.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): trains a tiny model and
objective with ``engine.fit`` and saves what each rank ends with to ``OUT/<case>-rank<R>.pt``.

The definitions here (data, model, objective, settings) are shared with the single-process
reference in tests/test_ddp.py. Everything is float64, so that rank-vs-single-process differences
are rounding only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from distill.balance import balance_weights
from distill.bench import benchmark_threads
from distill.data.samplers import PKSampler
from distill.engine import TrainSettings, fit
from distill.objective import StudentObjective
from distill.parallel import AllGather

NUM_IDS, PER_ID, SHAPE = 6, 6, (3, 4, 4)  # 36 images; batches of 3 ids x 2 images: 6 per epoch, 3 per rank
EMBED, TEACHER_DIM = 8, 5
LOSS = "softmax=1,triplet=1,verification=1"  # the verification head is a learnable part of the objective
# name: (gather, BatchNorm, task losses); "unused": no softmax and no teacher, so the classifier gets no gradient
CASES = {"local": (False, False, LOSS), "gather": (True, False, LOSS), "bn": (False, True, LOSS), "unused": (False, False, "triplet=1")}


class TinyData(torch.utils.data.Dataset):
    """Random images with fixed teacher outputs (a stand-in for the teacher cache), indexed like ImageDataset."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        n = NUM_IDS * PER_ID
        self.labels = [i // PER_ID for i in range(n)]
        self.images = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
        self.teacher_emb = F.normalize(torch.randn(n, TEACHER_DIM, generator=g, dtype=torch.float64), dim=1)
        self.teacher_logits = torch.randn(n, NUM_IDS, generator=g, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return self.images[i], self.labels[i], i

    def teacher(self, images: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.teacher_emb[indices], self.teacher_logits[indices]


class TinyNet(nn.Module):
    """Linear embedding + classifier; BatchNorm only when asked (its batch statistics are per rank)."""

    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(SHAPE[0] * SHAPE[1] * SHAPE[2], EMBED)
        self.bn = nn.BatchNorm1d(EMBED) if bn else nn.Identity()
        self.classifier = nn.Linear(EMBED, NUM_IDS)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.bn(self.proj(x.flatten(1)))
        return F.normalize(z, dim=1), self.classifier(z)


def run_under_torchrun(worker: Path, out: Path, world: int = 2) -> None:
    """Run ``worker`` (a script under tests/) with ``torchrun --standalone`` in ``world`` CPU processes,
    writing into ``out``; the test fails with the workers' output when they do."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", str(worker), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def build(bn: bool = False, loss: str = LOSS) -> tuple[nn.Module, StudentObjective]:
    """Model and objective (task losses with a verification head, KD, hard DarkRank over every other
    sample, RKD distance, and a regression with its learned projection), float64, seeded."""
    torch.manual_seed(0)
    model = TinyNet(bn).double()
    objective = StudentObjective(
        loss, EMBED, NUM_IDS, distill="kd=1,darkrank=0.1,rkd_distance=1,regression=1", teacher_embed_dim=TEACHER_DIM,
    ).double()
    return model, objective


def balanced(loss: str = LOSS) -> StudentObjective:
    """The objective of ``build`` with its distillation weights read as gradient ratios (``--distill-scale gradient``)."""
    torch.manual_seed(1)  # the regression's projection
    return StudentObjective(loss, EMBED, NUM_IDS, distill="kd=1,darkrank=0.1,rkd_distance=1,regression=1",
                            teacher_embed_dim=TEACHER_DIM, scaled=True).double()


def settings(gather: bool) -> TrainSettings:
    return TrainSettings(epochs=2, lr=1e-2, seed=3, workers=0, amp=False, gather_embeddings=gather)


def pk_sampler(labels: list[int], rank: int = 0, world: int = 1) -> PKSampler:
    """Batches of 3 identities x 2 images, rank ``rank``'s share of ``world``."""
    return PKSampler(labels, p=3, k=2, seed=3, rank=rank, world_size=world)


def gather_input(world: int) -> tuple[Tensor, Tensor]:
    """``x`` (rank r holds rows ``x.chunk(world)[r]``) and the weights of ``L = sum(w * x^3)``."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * 3, 4, generator=g, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=g, dtype=torch.float64)


def main(out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    x, w = gather_input(world)
    local = x.chunk(world)[rank].clone().requires_grad_()
    gathered = AllGather.apply(local)
    (w * gathered.pow(3)).sum().backward()  # the same L on every rank
    torch.save({"gathered": gathered.detach(), "grad": local.grad}, out / f"allgather-rank{rank}.pt")

    data = TinyData()
    model, _ = build()
    objective = balanced()
    weights = balance_weights(model, objective, data, pk_sampler(data.labels, rank, world), data.teacher,
                              torch.device("cpu"), torch.contiguous_format)
    torch.save({"scales": objective.distill.scales, "weights": weights}, out / f"balance-rank{rank}.pt")

    for case, (gather, bn, loss) in CASES.items():
        model, objective = build(bn, loss)
        teacher = data.teacher if loss == LOSS else None
        _, summary = fit(model, objective, data, pk_sampler(data.labels, rank, world), settings(gather), out / f"{case}.ckpt", teacher_fn=teacher, desc=case)
        params = {name: p.detach() for name, p in model.named_parameters()}
        torch.save({"model": params, "objective": objective.state_dict(), "fit": summary}, out / f"{case}-rank{rank}.pt")
    if rank == 0:
        threads = {"benchmark": benchmark_threads(), "training": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}
        (out / "threads.json").write_text(json.dumps(threads))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
