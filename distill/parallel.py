"""Data-parallel training under torchrun: the model and the objective in one module, so that one
``DistributedDataParallel`` wrapper averages the gradient of every trainable parameter (the model's
and the objective's: verification head, L-Softmax weights, HDML generator, regression projection),
and the all-gather that lets batch-level losses (triplet, DarkRank, RKD) span the global batch.

Gradients with ``gather``: every rank computes the same loss ``L`` of the global batch; the
differentiable all-gather (:class:`AllGather`) sends each rank's ``dL/d emb_r`` back to rank ``r``
summed over the ranks (``world_size x dL/d emb_r``), and DDP divides by ``world_size``: each
parameter receives exactly ``dL/d theta``, the gradient of one process trained on the concatenated
batch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn


class TrainStep(nn.Module):
    """``forward(images, labels, teacher_out) -> (loss, parts, local embeddings)``.

    Runs the model (under bf16 autocast when ``amp``), the objective in float32 (or wider) and
    ``penalty(model)`` inside one forward, so that DDP sees every parameter the loss touches.
    With ``gather`` (under torchrun only), embeddings, logits, labels and teacher outputs of all
    ranks are concatenated in rank order before the objective. The returned embeddings are this
    rank's, detached (for the importance sampler).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: nn.Module,
        penalty: Callable[[nn.Module], Tensor] | None = None,
        amp: bool = False,
        gather: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.objective = model, objective
        self.penalty, self.amp, self.gather = penalty, amp, gather

    def forward(self, images: Tensor, labels: Tensor, teacher_out: Any) -> tuple[Tensor, dict[str, float], Tensor]:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
            emb, logits = self.model(images)
        local = emb.detach()
        emb, logits = at_least_float32(emb), at_least_float32(logits)
        if self.gather:
            emb, logits = AllGather.apply(emb), AllGather.apply(logits)
            labels = gather(labels)
            if teacher_out is not None:
                teacher_out = tuple(None if t is None else gather(t) for t in teacher_out)
        loss, parts = self.objective(emb, logits, labels, teacher_out)
        if self.penalty is not None:
            reg = self.penalty(self.model)
            loss = loss + reg
            parts = {**parts, "weight_l2": reg.item()}
        return loss, parts, local


def at_least_float32(x: Tensor) -> Tensor:
    """At least float32 (bf16 under AMP -> float32; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """Every rank's ``x`` (same shape everywhere) concatenated along dim 0 in rank order; no gradient."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class AllGather(torch.autograd.Function):
    """:func:`gather` with a gradient: backward sums the gradient of the whole gathered tensor over the
    ranks and returns this rank's slice (a reduce-scatter, written with ``all_reduce`` so that it runs
    on gloo too). ``torch.distributed.nn.functional.all_gather`` does the same, but torch 2.14 warns that
    it is deprecated and points to a private module."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return gather(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def sum_over_ranks(x: Tensor) -> Tensor:
    """The sum of ``x`` over all ranks (a detached copy of ``x`` outside torchrun)."""
    x = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def data_parallel(step: TrainStep, device: torch.device) -> nn.Module:
    """``step`` in one DDP wrapper. ``find_unused_parameters``: not every loss uses every parameter
    at every step (the classifier without a softmax loss, KD without teacher logits, HDML's parts)."""
    return nn.parallel.DistributedDataParallel(
        step, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
    )
