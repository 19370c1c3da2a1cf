"""Embedding-level distillers: they need the teacher's embeddings only, never its logits, so they
work for any teacher (a foreign timm/torchvision/ONNX model with other classes or none).

- RKD distance and angle (Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019).
- PKT (Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
  ECCV 2018).
- Embedding regression through a learned projection (FitNets-style) when dimensions differ.
- A compatibility loss that puts the student in the teacher's embedding space, so student queries
  can be searched against a gallery the teacher indexed.

All take ``[N, D]`` embeddings of one minibatch (student and teacher rows are the same images),
detach the teacher and compute in float32 at least (float64 stays float64). Each is registered as a
distillation term (``--distill rkd_distance=1,pkt=1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.common import check_labels, check_pair, full_precision
from distill.losses.kd import embedding_regression
from distill.losses.mining import pairwise_sq_dist
from distill.losses.registry import LossInputs, register_loss

DIST_EPS = 1e-12  # squared distances are clamped here before the square root (finite gradient on duplicates)


def _normalised_distances(x: Tensor) -> Tensor:
    """RKD's psi_D: ``||x_i - x_j|| / mu`` with mu the mean distance over the pairs i != j."""
    d = pairwise_sq_dist(x).clamp_min(DIST_EPS).sqrt()
    off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return torch.where(off, d, 0.0) / d[off].mean().clamp_min(DIST_EPS)


@full_precision
def rkd_distance_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD-D (Park et al. 2019, distance-wise loss): mean over ordered pairs i != j of
    ``huber(psi_D(s_i, s_j), psi_D(t_i, t_j))``, ``psi_D = ||x_i - x_j|| / mu``, mu the batch's mean
    pair distance in that model's space, Huber with delta 1. Dimensions may differ."""
    check_pair(student_emb, teacher_emb, "rkd_distance_loss", 2)
    s, t = student_emb, teacher_emb.detach()
    off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    return F.huber_loss(_normalised_distances(s)[off], _normalised_distances(t)[off], delta=1.0)


def _angles(x: Tensor) -> Tensor:
    """RKD's psi_A: ``[N, N, N]`` with ``[j, i, k] = <e_ij, e_kj>``, ``e_ij = (x_i - x_j) / ||x_i - x_j||``
    (the cosine of the angle at x_j)."""
    e = F.normalize(x[None, :, :] - x[:, None, :], dim=2, eps=DIST_EPS)  # e[j, i] = unit(x_i - x_j)
    return e @ e.transpose(1, 2)


@full_precision
def rkd_angle_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD-A (Park et al. 2019, angle-wise loss): mean over triplets of distinct i, j, k of
    ``huber(psi_A(s_i, s_j, s_k), psi_A(t_i, t_j, t_k))``, psi_A the cosine of the angle at the middle
    point, Huber with delta 1. Dimensions may differ; O(N^3) memory (N=64: 262k entries)."""
    check_pair(student_emb, teacher_emb, "rkd_angle_loss", 3)
    s, t = student_emb, teacher_emb.detach()
    eye = torch.eye(len(s), dtype=torch.bool, device=s.device)
    distinct = ~(eye[:, :, None] | eye[:, None, :] | eye[None, :, :])  # j != i, j != k, i != k
    return F.huber_loss(_angles(s)[distinct], _angles(t)[distinct], delta=1.0)


def _conditional_probabilities(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """PKT's ``p_{j|i} = K(x_i, x_j) / sum_{k != i} K(x_i, x_k)`` with the cosine kernel
    ``K = (cos + 1) / 2``, over j != i; returns (p, log p) with the kernel clamped at ``eps``."""
    x = F.normalize(x, dim=1, eps=DIST_EPS)
    kernel = ((x @ x.T + 1.0) / 2.0).clamp_min(eps)
    off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    total = torch.where(off, kernel, 0.0).sum(1, keepdim=True)
    return torch.where(off, kernel / total, 0.0), torch.where(off, kernel.log() - total.log(), 0.0)


@full_precision
def pkt_loss(student_emb: Tensor, teacher_emb: Tensor, eps: float = 1e-7) -> Tensor:
    """PKT (Passalis & Tefas 2018, with their cosine-similarity kernel): mean over i of
    ``KL(p^t_{.|i} || p^s_{.|i}) = sum_{j != i} p^t_{j|i} log(p^t_{j|i} / p^s_{j|i})``.
    Kernel values are clamped at ``eps`` (antipodal points) so logs stay finite. Dimensions may differ."""
    check_pair(student_emb, teacher_emb, "pkt_loss", 2)
    _, log_ps = _conditional_probabilities(student_emb, eps)
    pt, log_pt = _conditional_probabilities(teacher_emb.detach(), eps)
    return (pt * (log_pt - log_ps)).sum(1).mean()


class EmbeddingRegression(nn.Module):
    """``mean_i ||W s_i - t_i||^2``: the student's embedding regressed onto the teacher's, through a
    learned linear projection ``W`` (``nn.Linear``) when the dimensions differ, directly when they
    match. ``W`` belongs to the training objective only: the exported student is unchanged."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        if student_dim < 1 or teacher_dim < 1:
            raise DistillError(f"embedding dimensions must be >= 1; got student {student_dim}, teacher {teacher_dim}")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.projection = nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)

    def forward(self, student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
        if student_emb.dim() != 2 or student_emb.shape[1] != self.student_dim:
            raise DistillError(
                f"EmbeddingRegression was built for student embeddings [N, {self.student_dim}]; got {list(student_emb.shape)}"
            )
        return self._regress(student_emb, teacher_emb)

    @full_precision
    def _regress(self, student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
        return embedding_regression(self.projection.to(student_emb.dtype)(student_emb), teacher_emb)


@full_precision
def compatibility_loss(student_emb: Tensor, teacher_emb: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Cross-model contrastive loss: each student embedding must find its identity among the
    teacher embeddings of the batch,

        mean_i -log( sum_{j: y_j = y_i} exp(c_ij / tau) / sum_j exp(c_ij / tau) ),  c_ij = cos(s_i, t_j),

    i.e. the student is trained as a query against a teacher-indexed gallery, which is how it is
    used afterwards (student-query -> teacher-gallery search). This is the "influence loss" of
    backward-compatible training (Shen et al., CVPR 2020) with the teacher's batch embeddings in
    place of its classifier, so it needs no teacher logits and works for any teacher; unlike plain
    regression ``||s_i - t_i||^2`` it only asks for the teacher's identity structure, not a copy of
    every teacher vector. Needs equal dimensions (one space): give the student the teacher's
    embedding size. ``t_i`` itself is always a positive, so every row has one.
    """
    check_pair(student_emb, teacher_emb, "compatibility_loss", 1)
    s, t = student_emb, teacher_emb.detach()
    if s.shape[1] != t.shape[1]:
        raise DistillError(
            f"compatibility_loss puts the student in the teacher's embedding space, so their dimensions must "
            f"match; got student {s.shape[1]} and teacher {t.shape[1]} (set --embed-dim {t.shape[1]})"
        )
    check_labels(s, labels)
    if not temperature > 0:
        raise DistillError(f"compatibility_loss temperature must be > 0; got {temperature}")
    logits = F.normalize(s, dim=1, eps=DIST_EPS) @ F.normalize(t, dim=1, eps=DIST_EPS).T / temperature
    same = labels[:, None] == labels[None, :]
    return (logits.logsumexp(1) - torch.where(same, logits, float("-inf")).logsumexp(1)).mean()


# ---------------------------------------------------------------- registered distillation terms


@register_loss("rkd_distance", kind="distill", needs=("teacher_emb",))
class RKDDistance(nn.Module):
    """RKD distance (Park et al. 2019): the batch's pair distances, each model at its own scale"""

    def forward(self, x: LossInputs) -> Tensor:
        return rkd_distance_loss(x.emb, x.teacher_emb)


@register_loss("rkd_angle", kind="distill", needs=("teacher_emb",))
class RKDAngle(nn.Module):
    """RKD angle (Park et al. 2019): the angles of the batch's triplets"""

    def forward(self, x: LossInputs) -> Tensor:
        return rkd_angle_loss(x.emb, x.teacher_emb)


@register_loss("pkt", kind="distill", needs=("teacher_emb",))
class PKT(nn.Module):
    """PKT (Passalis & Tefas 2018): the teacher's neighbour probabilities under a cosine kernel"""

    def forward(self, x: LossInputs) -> Tensor:
        return pkt_loss(x.emb, x.teacher_emb)


@register_loss("regression", kind="distill", needs=("teacher_emb",), learnable=True)
class Regression(nn.Module):
    """embedding regression ||W s - t||^2 (W learned when the sizes differ)"""

    def __init__(self, embed_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.regression = EmbeddingRegression(embed_dim, teacher_dim)

    def forward(self, x: LossInputs) -> Tensor:
        return self.regression(x.emb, x.teacher_emb)


@register_loss("compat", kind="distill", needs=("teacher_emb",))
class Compat(nn.Module):
    """compatibility: student queries against a teacher gallery (needs the teacher's embedding size)"""

    def __init__(self, embed_dim: int, teacher_dim: int) -> None:
        super().__init__()
        if teacher_dim != embed_dim:
            raise DistillError(
                f"the compat loss puts the student in the teacher's embedding space, so the student's embed_dim "
                f"must be the teacher's: got {embed_dim} and {teacher_dim} (set --embed-dim {teacher_dim})"
            )

    def forward(self, x: LossInputs) -> Tensor:
        # an unlabeled image (label -1) is its own identity: its one positive is its own teacher embedding
        own = -1 - torch.arange(len(x.labels), device=x.labels.device)
        return compatibility_loss(x.emb, x.teacher_emb, torch.where(x.labels >= 0, x.labels, own))
