"""RKD, PKT, embedding regression and the compatibility loss against float64 Python loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distill.errors import DistillError
from distill.losses.relational import (
    EmbeddingRegression,
    compatibility_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
)

F64 = torch.float64


def rand(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def huber(x: float, y: float) -> float:
    r = abs(x - y)
    return 0.5 * r * r if r <= 1.0 else r - 0.5


def py_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> float:
    s, t = s.tolist(), t.tolist()
    pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if i != j]
    mu_s = sum(dist(s[i], s[j]) for i, j in pairs) / len(pairs)
    mu_t = sum(dist(t[i], t[j]) for i, j in pairs) / len(pairs)
    return sum(huber(dist(s[i], s[j]) / mu_s, dist(t[i], t[j]) / mu_t) for i, j in pairs) / len(pairs)


def py_cos_angle(x: list[list[float]], i: int, j: int, k: int) -> float:
    """cos of the angle at x_j between x_i and x_k."""
    a = [p - q for p, q in zip(x[i], x[j])]
    b = [p - q for p, q in zip(x[k], x[j])]
    return sum(p * q for p, q in zip(a, b)) / (math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))


def py_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> float:
    s, t = s.tolist(), t.tolist()
    triplets = list(itertools.permutations(range(len(s)), 3))
    return sum(huber(py_cos_angle(s, i, j, k), py_cos_angle(t, i, j, k)) for i, j, k in triplets) / len(triplets)


def py_pkt(s: torch.Tensor, t: torch.Tensor) -> float:
    def probs(x: list[list[float]]) -> list[list[float]]:
        def kernel(a, b):
            cos = sum(p * q for p, q in zip(a, b)) / (math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))
            return (cos + 1) / 2

        rows = []
        for i in range(len(x)):
            total = sum(kernel(x[i], x[k]) for k in range(len(x)) if k != i)
            rows.append([kernel(x[i], x[j]) / total if j != i else 0.0 for j in range(len(x))])
        return rows

    ps, pt = probs(s.tolist()), probs(t.tolist())
    n = len(ps)
    return sum(pt[i][j] * math.log(pt[i][j] / ps[i][j]) for i in range(n) for j in range(n) if j != i) / n


def py_compat(s: torch.Tensor, t: torch.Tensor, labels: list[int], tau: float) -> float:
    s, t = s.tolist(), t.tolist()
    total = 0.0
    for i in range(len(s)):
        cos = [sum(p * q for p, q in zip(s[i], t[j])) / (math.sqrt(sum(p * p for p in s[i])) * math.sqrt(sum(q * q for q in t[j]))) for j in range(len(t))]
        all_ = sum(math.exp(c / tau) for c in cos)
        pos = sum(math.exp(c / tau) for j, c in enumerate(cos) if labels[j] == labels[i])
        total -= math.log(pos / all_)
    return total / len(s)


@pytest.mark.parametrize("seed", range(3))
def test_rkd_distance_against_loop(seed: int) -> None:
    s, t = rand(7, 4, seed), rand(7, 6, seed + 10)  # dimensions differ
    t[0] *= 6.0  # an outlier: residuals > 1 reach Huber's linear part
    assert rkd_distance_loss(s, t).item() == pytest.approx(py_rkd_distance(s, t), rel=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_rkd_angle_against_loop(seed: int) -> None:
    s, t = rand(6, 3, seed), rand(6, 5, seed + 10)
    assert rkd_angle_loss(s, t).item() == pytest.approx(py_rkd_angle(s, t), rel=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_pkt_against_loop(seed: int) -> None:
    s, t = rand(6, 3, seed), rand(6, 5, seed + 10)
    assert pkt_loss(s, t).item() == pytest.approx(py_pkt(s, t), rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_compatibility_against_loop(seed: int) -> None:
    s, t = rand(8, 4, seed), rand(8, 4, seed + 10)
    labels = [0, 0, 1, 1, 2, 2, 3, 0]
    value = compatibility_loss(s, t, torch.tensor(labels), temperature=0.3)
    assert value.item() == pytest.approx(py_compat(s, t, labels, 0.3), rel=1e-10)


def test_relational_losses_vanish_when_the_student_copies_the_teacher() -> None:
    t = rand(8, 5, 1)
    for fn in (rkd_distance_loss, rkd_angle_loss, pkt_loss):
        assert fn(t.clone(), t).item() == pytest.approx(0.0, abs=1e-12)
        assert fn(rand(8, 5, 2), t).item() > 1e-4
    # RKD is invariant to the scale of either space (it normalises by the mean distance), PKT and
    # RKD-A to any positive scale too (cosines)
    s = rand(8, 3, 3)
    for fn in (rkd_distance_loss, rkd_angle_loss, pkt_loss):
        assert fn(7.0 * s, t).item() == pytest.approx(fn(s, t).item(), rel=1e-10)


def test_compatibility_near_zero_for_a_student_in_the_teacher_space() -> None:
    labels = torch.arange(6).repeat_interleave(2)
    centres = torch.eye(6, dtype=F64)
    t = centres[labels] + 0.01 * rand(12, 6, 4)
    s = centres[labels] + 0.01 * rand(12, 6, 5)
    assert compatibility_loss(s, t, labels, temperature=0.05).item() < 1e-6
    assert compatibility_loss(s[:, torch.randperm(6)], t, labels, temperature=0.05).item() > 1.0  # another space


def test_gradcheck() -> None:
    t = rand(6, 5, 6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    for fn, s in [
        (rkd_distance_loss, rand(6, 3, 7)),
        (rkd_angle_loss, rand(6, 3, 8)),
        (pkt_loss, rand(6, 3, 9)),
        (lambda x, y: compatibility_loss(x, y, labels), rand(6, 5, 10)),
    ]:
        s.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: fn(x, t), (s,))


def test_duplicated_images_give_finite_gradients() -> None:
    s, t = rand(6, 4, 11), rand(6, 5, 12)
    s[3], t[3] = s[1], t[1]
    s.requires_grad_(True)
    for fn in (rkd_distance_loss, rkd_angle_loss, pkt_loss):
        fn(s, t).backward()
        assert torch.isfinite(s.grad).all()
        s.grad = None


def test_teacher_gets_no_gradient_and_autocast_computes_in_float32() -> None:
    s, t = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    labels = torch.arange(4).repeat(2)
    total = rkd_distance_loss(s, t) + rkd_angle_loss(s, t) + pkt_loss(s, t) + compatibility_loss(s, t, labels)
    total.backward()
    assert t.grad is None and torch.isfinite(s.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn in (rkd_distance_loss, rkd_angle_loss, pkt_loss):
            assert fn(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_embedding_regression_projects_when_dimensions_differ() -> None:
    s, t = rand(5, 3, 13), rand(5, 4, 14)
    reg = EmbeddingRegression(3, 4).double()
    assert isinstance(reg.projection, torch.nn.Linear) and len(list(reg.parameters())) == 2
    w, b = reg.projection.weight.tolist(), reg.projection.bias.tolist()
    ref = 0.0
    for i in range(5):
        proj = [sum(w[o][k] * s[i, k].item() for k in range(3)) + b[o] for o in range(4)]
        ref += sum((p - q) ** 2 for p, q in zip(proj, t[i].tolist()))
    assert reg(s, t).item() == pytest.approx(ref / 5, rel=1e-10)
    same = EmbeddingRegression(4, 4)
    assert isinstance(same.projection, torch.nn.Identity) and not list(same.parameters())
    assert same(t + 1.0, t).item() == pytest.approx(4.0)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: reg(x, t), (s,))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rkd_distance_loss(torch.zeros(4, 3), torch.zeros(5, 3)), r"same batch size; got \[4, 3\] and \[5, 3\]"),
        (lambda: rkd_angle_loss(torch.zeros(2, 3), torch.zeros(2, 3)), r"at least 3 samples \(got 2\)"),
        (lambda: pkt_loss(torch.zeros(1, 3), torch.zeros(1, 3)), r"at least 2 samples \(got 1\)"),
        (lambda: compatibility_loss(torch.zeros(4, 3), torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)), r"got student 3 and teacher 5 \(set --embed-dim 5\)"),
        (lambda: compatibility_loss(torch.ones(4, 3), torch.ones(4, 3), torch.zeros(4, dtype=torch.long), 0.0), "temperature must be > 0"),
        (lambda: compatibility_loss(torch.ones(4, 3), torch.ones(4, 3), torch.zeros(3, dtype=torch.long)), "one entry per embedding"),
        (lambda: EmbeddingRegression(3, 4)(torch.zeros(2, 5), torch.zeros(2, 4)), r"built for student embeddings \[N, 3\]"),
        (lambda: EmbeddingRegression(0, 4), "dimensions must be >= 1"),
    ],
)
def test_bad_inputs(call, message: str) -> None:
    with pytest.raises(DistillError, match=message):
        call()
