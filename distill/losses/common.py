"""What every loss shares: the float32 (or wider) preamble with autocast off, and the checks of
embeddings, teacher pairs and labels, each written once so every loss fails with the same words."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from distill.errors import DistillError

F = TypeVar("F", bound=Callable[..., Any])


def full_precision(fn: F) -> F:
    """Run ``fn`` with autocast off and its floating-point tensor arguments in one common dtype of at
    least float32 (bf16 under AMP -> float32; float64 stays float64): losses, logs and exps of
    distances are not computed in half precision."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.is_floating_point()]
        if not tensors:
            return fn(*args, **kwargs)
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)

        def wide(a: Any) -> Any:
            return a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a

        with torch.autocast(tensors[0].device.type, enabled=False):
            return fn(*map(wide, args), **{k: wide(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


def check_labels(emb: Tensor, labels: Tensor, what: str = "labels") -> None:
    """Raise a clear ``DistillError`` unless ``emb`` is ``[N, D]`` and ``labels`` an integer ``[N]``."""
    if emb.dim() != 2:
        raise DistillError(f"embeddings must be a 2-D tensor [N, D], got shape {tuple(emb.shape)}")
    if labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
        raise DistillError(
            f"{what} must be a 1-D tensor with one entry per embedding ({emb.shape[0]}), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DistillError(f"{what} must be integer class indices, got dtype {labels.dtype}")


def check_pair(
    student: Tensor, teacher: Tensor, name: str, min_n: int = 1, what: str = "embeddings [N, D]", same_shape: str | None = None
) -> None:
    """Student and teacher outputs of one minibatch: both 2-D with the same rows (the same shape when
    ``same_shape`` gives the hint that error ends with), at least ``min_n`` of them."""
    if same_shape is not None:
        if student.dim() != 2 or student.shape != teacher.shape:
            raise DistillError(
                f"{name} needs student and teacher {what} of the same shape; got "
                f"{list(student.shape)} and {list(teacher.shape)} ({same_shape})"
            )
    elif student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise DistillError(
            f"{name} needs student and teacher {what} of the same batch size; got "
            f"{list(student.shape)} and {list(teacher.shape)}"
        )
    if student.shape[0] < min_n:
        raise DistillError(f"{name} needs a batch of at least {min_n} samples (got {student.shape[0]})")
