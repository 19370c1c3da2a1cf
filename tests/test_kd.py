"""Hinton KD and embedding regression against Python-loop references in float64."""

from __future__ import annotations

import math

import pytest
import torch

from distill.errors import DistillError
from distill.losses.kd import embedding_regression, kd_loss

F64 = torch.float64


def py_softmax(row: list[float], temperature: float) -> list[float]:
    top = max(row)
    exps = [math.exp((x - top) / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def py_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    total = 0.0
    for srow, trow in zip(student.tolist(), teacher.tolist()):
        ps, pt = py_softmax(srow, temperature), py_softmax(trow, temperature)
        total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
    return temperature**2 * total / len(student)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 10.0])
def test_kd_matches_loop(temperature: float) -> None:
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        student, teacher = torch.randn(2, 5, 7, generator=g, dtype=F64).mul(3).unbind()
        assert kd_loss(student, teacher, temperature).item() == pytest.approx(py_kd(student, teacher, temperature), rel=1e-12)


def test_kd_is_zero_for_equal_logits_up_to_shift() -> None:
    logits = torch.randn(4, 6, dtype=F64)
    assert kd_loss(logits + 2.5, logits).abs().item() < 1e-12
    assert kd_loss(logits.flip(1), logits).item() > 1e-3


def test_kd_t_squared_keeps_gradient_scale() -> None:
    """Hinton Sec. 2.1: at high T the gradient tends to (z - v) / (N C) for zero-mean logits; the T^2
    factor is what makes it independent of T."""
    g = torch.Generator().manual_seed(5)
    n, c = 3, 5
    z = torch.randn(n, c, generator=g, dtype=F64)
    v = torch.randn(n, c, generator=g, dtype=F64)
    z, v = z - z.mean(1, keepdim=True), v - v.mean(1, keepdim=True)
    for temperature in (1e3, 1e4):
        zz = z.clone().requires_grad_(True)
        kd_loss(zz, v, temperature).backward()
        torch.testing.assert_close(zz.grad, (z - v) / (n * c), rtol=1e-2, atol=0)


def test_kd_teacher_detached_and_autocast_float32() -> None:
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    kd_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = kd_loss(student.bfloat16(), teacher.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(kd_loss(student.bfloat16().float(), teacher.bfloat16().float()).item(), rel=1e-6)


def test_embedding_regression_matches_loop() -> None:
    g = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(2, 4, 3, generator=g, dtype=F64).unbind()
    ref = sum(sum((a - b) ** 2 for a, b in zip(s, t)) for s, t in zip(student.tolist(), teacher.tolist())) / 4
    assert embedding_regression(student, teacher).item() == pytest.approx(ref, rel=1e-12)
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    embedding_regression(student, teacher).backward()
    assert teacher.grad is None
    torch.testing.assert_close(student.grad, 2 * (student - teacher).detach() / 4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kd_loss(torch.zeros(4, 5), torch.zeros(4, 6)), r"same shape; got \[4, 5\] and \[4, 6\]"),
        (lambda: kd_loss(torch.zeros(5), torch.zeros(5)), r"logits \[N, C\]"),
        (lambda: kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0), "temperature must be > 0; got 0.0"),
        (lambda: embedding_regression(torch.zeros(4, 64), torch.zeros(4, 128)), r"got \[4, 64\] and \[4, 128\]"),
    ],
)
def test_bad_inputs(call, message: str) -> None:
    with pytest.raises(DistillError, match=message):
        call()
