"""Distillation weights that mean the same on every data set (``--distill-scale gradient``).

A fixed weight does not: at the start of training the default ``kd=3`` pulls the student with 1.5x
the task loss's gradient on the embedded set, 3.4x on Yale faces and 4.9x on digits (docs/results.md).
Here each ``--distill`` weight ``r_i`` is read as that ratio: before the first step, on the first
``BATCHES`` training batches, the gradient norms with respect to the student's parameters give

    w_i = r_i * sum_b ||grad L_task(b)|| / sum_b ||grad L_i(b)||,

which is then the term's loss weight for the whole training (``WeightedSum.scales = w_i / r_i``).
The measurement runs on a copy of the student with the random state restored afterwards, so the
training itself starts exactly as it would with fixed weights.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from distill.data.mixing import with_mixed_rows
from distill.errors import DistillError
from distill.losses.registry import LossInputs
from distill.objective import StudentObjective
from distill.parallel import at_least_float32, sum_over_ranks

BATCHES = 4  # averaged: one batch's ratio moves by ~10 % with its identities


def balance_weights(
    model: nn.Module, objective: StudentObjective, dataset: Dataset, sampler: Sampler[list[int]],
    teacher_fn: Callable[[Tensor, Tensor], Any], device: torch.device, memory_format: torch.memory_format,
    mix_rows: int = 0,
) -> dict[str, float]:
    """Set ``objective.distill.scales`` from the gradient norms of the first ``BATCHES`` batches of
    ``sampler`` (with ``mix_rows`` mixed images each, as in training; see the module docstring; under
    torchrun every rank's batches, summed) and return the loss weight each term now has. A term whose
    gradient is zero on every batch keeps its weight as given."""
    distill = objective.distill
    probe = copy.deepcopy(model).to(device=device, memory_format=memory_format).train()
    params = [p for p in probe.parameters() if p.requires_grad]
    task_norm, term_norms = 0.0, [0.0] * len(distill.terms)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for b, indices in enumerate(sampler):
            if b == BATCHES:
                break
            items = [dataset[i] for i in indices]
            images, labels, rows = with_mixed_rows(  # as the loader gives them, mixed as in training
                torch.stack([item[0] for item in items]), torch.tensor([item[1] for item in items]),
                torch.tensor([item[2] for item in items]), mix_rows,
            )
            images, labels = images.to(device, memory_format=memory_format), labels.to(device)
            t_emb, t_logits = teacher_fn(images, rows)
            emb, logits = probe(images)
            emb, logits = at_least_float32(emb), at_least_float32(logits)  # as the training's loss sees them
            task, _ = objective.task_of_labeled(emb, logits, labels, t_emb)
            _, parts, _ = distill.add_to(LossInputs(emb, logits, labels, t_emb, t_logits), emb.sum() * 0)
            task_norm += _grad_norm(task, params)
            for i, (name, _) in enumerate(distill.terms):
                term_norms[i] += _grad_norm(parts[name], params) if name in parts else 0.0
    norms = sum_over_ranks(torch.tensor([task_norm, *term_norms], dtype=torch.float64, device=device)).tolist()
    task_norm, term_norms = norms[0], norms[1:]
    if not task_norm > 0:
        raise DistillError("--distill-scale gradient measures each distillation term against the task loss, and this "
                           "training has none (unlabeled images alone?): use --distill-scale fixed")
    scales = [task_norm / norm if norm > 0 and math.isfinite(norm) else 1.0 for norm in term_norms]
    distill.scales.copy_(torch.tensor(scales, dtype=distill.scales.dtype))
    return {name: weight * scale for (name, weight), scale in zip(distill.terms, scales)}


def _grad_norm(loss: Tensor, params: list[nn.Parameter]) -> float:
    """The L2 norm of ``d loss / d params`` over all of them (float64 sum)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))
