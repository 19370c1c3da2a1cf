"""Task losses of the seed papers, vectorised over the minibatch, and their registered classes
(``--loss softmax=1,triplet=1``; HDML's are in :mod:`distill.losses.hdml`).

Embeddings are ``[N, D]``, labels integer ``[N]``. Losses that need a tuple the batch does not hold
(no positive pair, no negative, a single class) return a documented zero that keeps the graph,
never NaN; malformed input raises ``DistillError``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.common import check_labels
from distill.losses.mining import dense_triplet_mask, pairwise_sq_dist, positive_negative_masks
from distill.losses.registry import LossInputs, Term, boolean, integer, number, one_of, register_loss

MINING = ("all", "hard", "semihard")


def _zero(x: Tensor) -> Tensor:
    """A zero that depends on ``x`` (so backward and DDP see the graph)."""
    return x.sum() * 0.0


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 when the mask is empty."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def softmax_loss(logits: Tensor, labels: Tensor, smoothing: float = 0.0) -> Tensor:
    """Classification: cross-entropy of the classifier head's logits ``[N, C]``; with ``smoothing``
    eps the target is ``(1 - eps) one_hot + eps / C`` (label smoothing, Szegedy et al. 2016)."""
    check_labels(logits, labels)
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


class VerificationHead(nn.Module):
    """``(f_i - f_j)^2 -> Linear -> 2 logits`` (different / same identity), as in re-ID verification models."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, 2)

    def forward(self, f_i: Tensor, f_j: Tensor) -> Tensor:
        return self.fc((f_i - f_j).pow(2))


def verification_loss(emb: Tensor, labels: Tensor, head: VerificationHead, balanced: bool = True) -> Tensor:
    """Cross-entropy on same/different identity over all pairs ``i < j`` of the minibatch.

    ``balanced`` weights the positive and the negative pairs as two equal halves (a PK batch holds
    far more negative pairs); otherwise every pair counts once. Fewer than two samples -> 0.
    """
    check_labels(emb, labels)
    i, j = torch.triu_indices(len(labels), len(labels), 1, device=emb.device)
    if len(i) == 0:
        return _zero(emb) + _zero(head.fc.weight)
    same = (labels[i] == labels[j]).long()
    ce = F.cross_entropy(head(emb[i], emb[j]), same, reduction="none")
    if not balanced:
        return ce.mean()
    n_pos, n_neg = same.sum(), (1 - same).sum()
    weight = same / n_pos.clamp_min(1) + (1 - same) / n_neg.clamp_min(1)
    return (ce * weight).sum() / ((n_pos > 0).long() + (n_neg > 0).long())


def large_margin_logits(x: Tensor, weight: Tensor, labels: Tensor, margin: int, lam: float = 0.0) -> Tensor:
    """L-Softmax logits (Liu et al. 2016, Eq. 4-6): the target logit ``||W|| ||x|| cos(theta)`` becomes
    ``||W|| ||x|| psi(theta)``, ``psi = (-1)^k cos(m theta) - 2k`` on ``[k pi/m, (k+1) pi/m]``, with
    ``cos(m theta)`` expanded as a polynomial in ``cos(theta)`` (so gradients stay exact). ``lam`` is the
    paper's training trick ``(lam cos + psi) / (1 + lam)`` (0 = pure L-Softmax). No bias.
    """
    if not (isinstance(margin, int) and margin >= 1):
        raise DistillError(f"L-Softmax margin must be an integer >= 1, got {margin!r}")
    check_labels(x, labels)
    logits = x @ weight.T
    norms = weight.norm(dim=1)[labels] * x.norm(dim=1)
    cos = (logits.gather(1, labels.unsqueeze(1)).squeeze(1) / norms.clamp_min(1e-12)).clamp(-1.0, 1.0)
    sin2 = 1.0 - cos.pow(2)
    cos_m = sum(
        (-1) ** n * math.comb(margin, 2 * n) * cos.pow(margin - 2 * n) * sin2.pow(n) for n in range(margin // 2 + 1)
    )
    k = torch.floor(torch.acos(cos.detach()) * margin / math.pi).clamp(max=margin - 1)
    psi = (1.0 - 2.0 * (k % 2)) * cos_m - 2.0 * k
    target = norms * (lam * cos + psi) / (1.0 + lam)
    return logits.scatter(1, labels.unsqueeze(1), target.unsqueeze(1))


class LargeMarginSoftmax(nn.Module):
    """L-Softmax classifier on the embedding: own weights ``[C, D]``; ``forward`` returns the loss."""

    def __init__(self, embed_dim: int, num_classes: int, margin: int = 2, lam: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.xavier_uniform_(self.weight)
        self.margin = margin
        self.lam = lam

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(large_margin_logits(x, self.weight, labels, self.margin, self.lam), labels)


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """Deep Ranking's hinge: ``mean max(0, g + ||a - p||^2 - ||a - n||^2)`` over the given triplets."""
    if not anchor.shape == positive.shape == negative.shape or anchor.dim() != 2:
        raise DistillError(
            "triplet_loss needs anchor, positive and negative of the same shape [T, D], got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    if len(anchor) == 0:
        return _zero(anchor)
    d_ap = (anchor - positive).pow(2).sum(1)
    d_an = (anchor - negative).pow(2).sum(1)
    return F.relu(margin + d_ap - d_an).mean()


def batch_triplet_terms(emb: Tensor, labels: Tensor, margin: float, mining: str = "all") -> tuple[Tensor, Tensor]:
    """The hinge terms of :func:`batch_triplet_loss` and the mask of those that count (their number
    is the T of the mean; Deep Ranking's weight penalty is scaled by 1 / T)."""
    if mining not in MINING:
        raise DistillError(f"unknown triplet mining {mining!r}; choose one of {', '.join(MINING)}")
    check_labels(emb, labels)
    d = pairwise_sq_dist(emb)
    pos, neg = positive_negative_masks(labels)
    if mining == "all":
        return F.relu(margin + d.unsqueeze(2) - d.unsqueeze(1)), pos.unsqueeze(2) & neg.unsqueeze(1)
    if mining == "hard":
        hardest_pos = torch.where(pos, d, 0.0).amax(1)
        hardest_neg = torch.where(neg, d, d.detach().max() + 1.0).amin(1)
        return F.relu(margin + hardest_pos - hardest_neg), pos.any(1) & neg.any(1)
    outside = neg.unsqueeze(1) & (d.unsqueeze(1) > d.unsqueeze(2))  # [a, p, n]: negative beyond p
    big = d.detach().max() + 1.0
    semi = torch.where(outside, d.unsqueeze(1), big).amin(2)
    easiest = torch.where(neg, d, 0.0).amax(1, keepdim=True).expand_as(d)
    chosen = torch.where(outside.any(2), semi, easiest)
    return F.relu(margin + d - chosen), pos & neg.any(1, keepdim=True)


def batch_triplet_loss(emb: Tensor, labels: Tensor, margin: float, mining: str = "all") -> Tensor:
    """Triplet hinge on squared distances over the minibatch's triplets, chosen by ``mining``:

    - ``all``: mean over every valid ``(a, p, n)`` (``y_a = y_p``, ``a != p``, ``y_n != y_a``).
    - ``hard`` (batch-hard, Hermans et al. 2017): per anchor the farthest positive and nearest
      negative; mean over anchors that have both.
    - ``semihard`` (FaceNet, Schroff et al. 2015): per positive pair ``(a, p)`` the nearest negative
      farther than ``p`` (``D_an > D_ap``), or the farthest negative if none is; mean over pairs.

    A batch without any such tuple gives 0.
    """
    return _masked_mean(*batch_triplet_terms(emb, labels, margin, mining))


def l2_weight_penalty(params: Iterable[Tensor], lam: float = 1e-3) -> Tensor:
    """Deep Ranking's ``lambda ||W||^2`` (lambda = 0.001) over weight matrices and kernels (parameters
    with more than one dimension; biases and norm scales are left out). Equivalent to SGD
    ``weight_decay = 2 * lambda`` on those parameters. The paper adds it to a *sum* over triplets;
    next to a mean over T triplets pass ``lam / T`` (``TaskLoss.weight_penalty`` does)."""
    weights = [p for p in params if p.dim() > 1]
    if not weights:
        raise DistillError("l2_weight_penalty found no weight matrices among the given parameters")
    return lam * sum(w.pow(2).sum() for w in weights)


def lifted_structured_loss(emb: Tensor, labels: Tensor, margin: float = 1.0) -> Tensor:
    """Lifted structured loss (Song et al. 2016, Eq. 4): with Euclidean ``D`` from the dense
    ``D^2 = x~ 1' + 1 x~' - 2 X X'`` (clamped at 1e-12 before the square root),
    ``J~_ij = log(sum_{(i,k) in N} exp(margin - D_ik) + sum_{(j,l) in N} exp(margin - D_jl)) + D_ij``
    and ``J = 1 / (2|P|) sum_{(i,j) in P} max(0, J~_ij)^2`` over positive pairs ``i < j``.
    No positive pair or no negative pair in the batch -> 0.
    """
    check_labels(emb, labels)
    d = pairwise_sq_dist(emb).clamp_min(1e-12).sqrt()
    pos, neg = positive_negative_masks(labels)
    # a finite stand-in for log(0) keeps logsumexp's backward free of NaN when a row has no negatives
    lse = torch.where(neg, margin - d, torch.finfo(d.dtype).min).logsumexp(1)
    j = torch.logaddexp(lse.unsqueeze(1), lse.unsqueeze(0)) + d
    return _masked_mean(F.relu(j).pow(2), pos) / 2.0


def log_ratio_loss(emb: Tensor, targets: Tensor, eps: float = 1e-6) -> Tensor:
    """Log-ratio loss (Kim et al. 2019, Eq. 3) with dense triplet mining on continuous labels.

    ``targets`` ``[N]`` or ``[N, d]``; ``D`` = squared Euclidean distance on both embeddings and targets;
    mean over all ``(a, i, j)``, ``i, j != a``, with ``D(y_a, y_i) < D(y_a, y_j)`` of
    ``(log D(f_a, f_i) - log D(f_a, f_j) - log D(y_a, y_i) + log D(y_a, y_j))^2``, every log taken of
    ``D + eps`` (``eps = 1e-6`` keeps coincident points finite). No such triplet -> 0.
    """
    if emb.dim() != 2 or targets.dim() not in (1, 2) or targets.shape[0] != emb.shape[0]:
        raise DistillError(
            f"log_ratio_loss needs embeddings [N, D] and targets [N] or [N, d] with the same N, got "
            f"{tuple(emb.shape)} and {tuple(targets.shape)}"
        )
    y = targets.reshape(len(targets), -1).to(emb.dtype)
    log_f = torch.log(pairwise_sq_dist(emb) + eps)
    dy = pairwise_sq_dist(y)
    log_y = torch.log(dy + eps)
    r = (log_f.unsqueeze(2) - log_f.unsqueeze(1)) - (log_y.unsqueeze(2) - log_y.unsqueeze(1))
    return _masked_mean(r.pow(2), dense_triplet_mask(dy))


def n_pair_loss(anchors: Tensor, positives: Tensor, scale: float = 1.0) -> Tensor:
    """Multi-class N-pair loss (Sohn 2016, Eq. 5) with the similarities multiplied by ``scale``:
    ``mean_i log(1 + sum_{j != i} exp(scale (f_i' f_j+ - f_i' f_i+))) = CE(scale f_i' f_j+ over j, target i)``.

    ``scale = 1`` is Sohn's form, meant for unnormalised embeddings. On L2-normalised ones the
    similarities lie in [-1, 1], so with scale 1 even perfectly separated classes cost
    ``log(1 + (N - 1) / e)`` (1.87 for 16 pairs); a scale (as in NormFace, Wang et al. 2017) lets the
    loss reach ~0: ``log(1 + 15 e^-16) ~ 2e-6`` at scale 16.

    ``positives`` is ``[N, D]`` (one per anchor, each anchor's negatives are the others' positives) or
    ``[N, N, D]`` (per-anchor candidate rows, ``positives[i, i]`` the positive; HDML's synthetic tuples).
    """
    n = anchors.shape[0]
    if anchors.dim() != 2 or positives.shape not in ((n, anchors.shape[1]), (n, n, anchors.shape[1])):
        raise DistillError(
            f"n_pair_loss needs anchors [N, D] and positives [N, D] or [N, N, D], got "
            f"{tuple(anchors.shape)} and {tuple(positives.shape)}"
        )
    if n == 0:
        return _zero(anchors) + _zero(positives)
    if not scale > 0:
        raise DistillError(f"n_pair_loss scale must be > 0, got {scale}")
    logits = anchors @ positives.T if positives.dim() == 2 else torch.einsum("nd,nmd->nm", anchors, positives)
    return F.cross_entropy(scale * logits, torch.arange(n, device=anchors.device))


def n_pair_indices(labels: Tensor) -> tuple[Tensor, Tensor]:
    """One (anchor, positive) per class with two or more samples: the class's first and second
    sample in batch order (classes sorted by label; pytorch-metric-learning picks the same pairs)."""
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    pos = torch.arange(len(labels), device=labels.device)
    starts = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    rank = pos - torch.cummax(torch.where(starts, pos, 0), 0).values
    second = (rank == 1).nonzero().squeeze(1)
    return order[second - 1], order[second]


def batch_n_pair_loss(emb: Tensor, labels: Tensor, scale: float = 1.0) -> Tensor:
    """N-pair loss on a labelled minibatch (pairs from ``n_pair_indices``); no pair -> 0."""
    check_labels(emb, labels)
    a, p = n_pair_indices(labels)
    return n_pair_loss(emb[a], emb[p], scale)


# ---------------------------------------------------------------- registered task losses


@register_loss(
    "softmax", kind="task", defaults={"softmax_smoothing": 0.0},
    checks={"softmax_smoothing": number(0.0, high=1.0)}, needs=("labels",),
)
class Softmax(nn.Module):
    """cross-entropy on the classifier logits"""

    def __init__(self, softmax_smoothing: float) -> None:
        super().__init__()
        self.smoothing = softmax_smoothing  # label smoothing eps: 0 = plain cross-entropy

    def forward(self, x: LossInputs) -> Tensor:
        return softmax_loss(x.logits, x.labels, self.smoothing)


@register_loss(
    "verification", kind="task", defaults={"verification_balanced": True}, checks={"verification_balanced": boolean},
    needs=("labels", "positives"), learnable=True,
)
class Verification(nn.Module):
    """same/different identity on (f_i - f_j)^2 of minibatch pairs"""

    def __init__(self, verification_balanced: bool, embed_dim: int) -> None:
        super().__init__()
        self.balanced = verification_balanced  # positive and negative pairs weigh one half each
        self.head = VerificationHead(embed_dim)

    def forward(self, x: LossInputs) -> Tensor:
        return verification_loss(x.emb, x.labels, self.head, self.balanced)


@register_loss(
    "lsoftmax", kind="task", defaults={"lsoftmax_margin": 2, "lsoftmax_lambda": 0.0},
    checks={"lsoftmax_margin": integer(1), "lsoftmax_lambda": number(0.0)}, needs=("labels",), learnable=True,
)
class LSoftmax(nn.Module):
    """large-margin softmax (L-Softmax) on the embedding"""

    def __init__(self, lsoftmax_margin: int, lsoftmax_lambda: float, embed_dim: int, num_classes: int) -> None:
        super().__init__()  # margin: integer m, 1 = plain softmax; lambda: the training trick, 0 = pure L-Softmax
        self.classifier = LargeMarginSoftmax(embed_dim, num_classes, lsoftmax_margin, lsoftmax_lambda)

    def forward(self, x: LossInputs) -> Tensor:
        return self.classifier(x.emb, x.labels)


@register_loss(
    "triplet", kind="task", defaults={"triplet_margin": 0.2, "triplet_mining": "hard"},
    checks={"triplet_margin": number(0.0, strict=True), "triplet_mining": one_of(*MINING)}, needs=("labels", "positives"),
)
class Triplet(nn.Module):
    """triplet hinge on squared distances with batch mining"""

    def __init__(self, triplet_margin: float, triplet_mining: str) -> None:
        super().__init__()  # margin g on squared distances of L2-normalised embeddings; mining all | hard | semihard
        self.margin, self.mining = triplet_margin, triplet_mining

    def forward(self, x: LossInputs) -> Term:
        hinges, counted = batch_triplet_terms(x.emb, x.labels, self.margin, self.mining)
        return Term(_masked_mean(hinges, counted), count=counted.sum())


@register_loss(
    "lifted", kind="task", defaults={"lifted_margin": 1.0}, checks={"lifted_margin": number(0.0, strict=True)},
    needs=("labels", "positives"),
)
class Lifted(nn.Module):
    """lifted structured loss"""

    def __init__(self, lifted_margin: float) -> None:
        super().__init__()
        self.margin = lifted_margin  # alpha

    def forward(self, x: LossInputs) -> Tensor:
        return lifted_structured_loss(x.emb, x.labels, self.margin)


@register_loss(
    "npair", kind="task", defaults={"npair_scale": 16.0}, checks={"npair_scale": number(0.0, strict=True)},
    needs=("labels", "positives"),
)
class NPair(nn.Module):
    """multi-class N-pair loss"""

    def __init__(self, npair_scale: float) -> None:
        super().__init__()
        self.scale = npair_scale  # similarities x scale on L2-normalised embeddings (1 = Sohn's unscaled form)

    def forward(self, x: LossInputs) -> Tensor:
        return batch_n_pair_loss(x.emb, x.labels, self.scale)


@register_loss(
    "logratio", kind="task", defaults={"logratio_eps": 1e-6}, checks={"logratio_eps": number(0.0, strict=True)},
    needs=("labels", "teacher_emb"),
)
class LogRatio(nn.Module):
    """log-ratio loss on the teacher's embedding distances"""

    def __init__(self, logratio_eps: float) -> None:
        super().__init__()
        self.eps = logratio_eps  # inside the logs

    def forward(self, x: LossInputs) -> Tensor:
        return log_ratio_loss(x.emb, x.teacher_emb, self.eps)
