"""DarkRank: rank-level transfer of cross-sample similarities (Chen, Wang & Zhang, arXiv 1707.01220).

Every query ranks its M candidates by a score ``S(x) = -alpha * ||q - x||_2^beta`` (higher = more
similar) and the ranking is modelled with Plackett-Luce:

    P(pi | s) = prod_i exp(s_pi(i)) / sum_{k >= i} exp(s_pi(k)).

- hard DarkRank: ``-log P(pi_t | s)``, pi_t the teacher's ranking (ListMLE). ListMLE@k keeps the
  first k factors: the teacher's first k picks, each normalised over ALL candidates still remaining.
- soft DarkRank: ``KL(P(.|t) || P(.|s))`` over all M! rankings. The paper enumerates them
  (M <= 8). By the chain rule of KL it is a sum over the sets S still unranked after some prefix:

      KL = sum_S q(S) * KL(softmax(t_S) || softmax(s_S)),

  where q(S) is the teacher probability that S is exactly the unranked set at some step;
  q(full) = 1 and q(S - {j}) += q(S) * softmax(t_S)_j. One pass over the 2^M subsets, layer by
  layer of subset size, gives the exact KL in O(M 2^M) instead of O(M * M!), and its student
  gradient ``dKL/ds_j = sum_{S containing j} q(S) * (softmax(s_S)_j - softmax(t_S)_j)``.
  Beyond 20 candidates: "sampled" averages ``log P_t(pi) - log P_s(pi)`` over rankings pi ~ P_t;
  "sampled_prefix" averages the same chain-rule sum over the sets S that a sampled pi passes
  through, ``sum_i KL(softmax(t_{S_i}) || softmax(s_{S_i}))``, exact per step, so only the choice
  of sets is random (same mean, lower variance).

The per-row KL computations are in :mod:`distill.losses.plackett_luce`.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.common import check_pair, full_precision
from distill.losses.plackett_luce import (
    _chunk_rows, _RowwiseKL, _soft_bruteforce_rows, _soft_exact_rows, _soft_sampled,
    _soft_sampled_prefix_rows,
)
from distill.losses.registry import LossInputs, register_loss

METHODS = ("exact", "bruteforce", "sampled", "sampled_prefix")
MODES = ("hard", "soft")
MAX_EXACT_M = 20
MAX_BRUTEFORCE_M = 9
DIST_EPS = 1e-12  # distances below it count as DIST_EPS in the scores (finite gradient for beta < 1)


def darkrank_scores(query_emb: Tensor, cand_emb: Tensor, alpha: float = 3.0, beta: float = 3.0) -> Tensor:
    """Similarity scores ``-alpha * ||q - x||_2^beta`` of each query's candidates.

    ``query_emb`` is [Q, D]; ``cand_emb`` is [Q, M, D] (a list per query) or [M, D] (shared).
    Returns [Q, M]. The distance is clamped at ``DIST_EPS`` before the power, so duplicated images
    (zero distance) give a zero, finite gradient for every beta > 0 (``d^beta`` alone has an
    infinite slope at 0 when beta < 1); values move by at most ``alpha * DIST_EPS^beta``.
    """
    if query_emb.dim() != 2 or cand_emb.dim() not in (2, 3) or cand_emb.shape[-1] != query_emb.shape[-1]:
        raise DistillError(
            f"darkrank_scores needs query_emb [Q, D] and cand_emb [Q, M, D] or [M, D] with the same D; "
            f"got {list(query_emb.shape)} and {list(cand_emb.shape)}"
        )
    if cand_emb.dim() == 3 and cand_emb.shape[0] != query_emb.shape[0]:
        raise DistillError(
            f"darkrank_scores: cand_emb has lists for {cand_emb.shape[0]} queries but query_emb has "
            f"{query_emb.shape[0]}"
        )
    dist = torch.linalg.vector_norm(query_emb[:, None, :] - cand_emb, dim=-1)
    return -alpha * dist.clamp_min(DIST_EPS).pow(beta)


def _prepare(s_scores: Tensor, t_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Check [Q, M] shapes; return (student, detached teacher)."""
    if s_scores.dim() != 2 or s_scores.shape != t_scores.shape:
        raise DistillError(
            f"DarkRank scores must be [Q, M] tensors of the same shape; got student "
            f"{list(s_scores.shape)} and teacher {list(t_scores.shape)}"
        )
    if s_scores.shape[0] == 0 or s_scores.shape[1] == 0:
        raise DistillError(f"DarkRank needs at least one query and one candidate; got scores {list(s_scores.shape)}")
    if not (s_scores.is_floating_point() and t_scores.is_floating_point()):
        raise DistillError(f"DarkRank scores must be floating point; got {s_scores.dtype} and {t_scores.dtype}")
    return s_scores, t_scores.detach()


@full_precision
def hard_darkrank(s_scores: Tensor, t_scores: Tensor, topk: int | None = None) -> Tensor:
    """Hard DarkRank: mean over rows of ``-log P(pi_t | s)``, pi_t = teacher scores sorted
    descending (ties keep candidate order).

    ``topk=k`` is ListMLE@k: only the first k factors of P, i.e. the teacher's first k picks, each
    a softmax over all M candidates not yet picked (never Plackett-Luce on a cut sub-list, which
    would let the student rank an outside candidate first for free). ``k >= M - 1`` is the full list.
    """
    s, t = _prepare(s_scores, t_scores)
    if topk is not None and topk < 1:
        raise DistillError(f"DarkRank topk must be >= 1 (or None for the whole ranking); got {topk}")
    order = t.sort(dim=1, descending=True, stable=True).indices
    last_first = s.gather(1, order.flip(1))
    steps = last_first - last_first.logcumsumexp(-1)  # log-softmax of each pick, last pick first
    if topk is not None:
        steps = steps[:, -topk:]
    return -steps.sum(-1).mean()


@full_precision
def soft_darkrank(s_scores: Tensor, t_scores: Tensor, method: str = "exact", num_samples: int = 128) -> Tensor:
    """Soft DarkRank: mean over rows of KL(P(.|t) || P(.|s)) over all M! rankings.

    ``method``: "exact" (subset DP, M <= 20), "bruteforce" (enumeration, M <= 9), "sampled"
    (unbiased Monte-Carlo estimate from ``num_samples`` teacher rankings per row, any M), or
    "sampled_prefix" (unbiased, lower variance: exact per-step KL along ``num_samples`` sampled
    teacher rankings per row, any M, O(num_samples * M^2) per row).
    """
    if method not in METHODS:
        raise DistillError(f"unknown DarkRank method {method!r}; choose one of {', '.join(METHODS)}")
    s, t = _prepare(s_scores, t_scores)
    m = s.shape[1]
    if method == "sampled":
        if num_samples < 1:
            raise DistillError(f"DarkRank num_samples must be >= 1; got {num_samples}")
        return _soft_sampled(s, t, num_samples).mean()
    if method == "sampled_prefix":
        if num_samples < 1:
            raise DistillError(f"DarkRank num_samples must be >= 1; got {num_samples}")
        rows_fn = functools.partial(_soft_sampled_prefix_rows, num_samples=num_samples)
        chunk = _chunk_rows(num_samples * m * m, s.element_size(), 6)
        return _RowwiseKL.apply(s, t, rows_fn, chunk).mean()
    if method == "exact":
        if m > MAX_EXACT_M:
            raise DistillError(
                f"exact soft DarkRank supports at most {MAX_EXACT_M} candidates per query (got M={m}); "
                f"use a list size <= {MAX_EXACT_M} or method 'sampled_prefix'"
            )
        chunk = _chunk_rows(math.comb(m, m // 2) * m + 2**m, s.element_size(), 8)
        return _RowwiseKL.apply(s, t, _soft_exact_rows, chunk).mean()
    if m > MAX_BRUTEFORCE_M:
        raise DistillError(
            f"bruteforce soft DarkRank enumerates M! rankings and supports M <= {MAX_BRUTEFORCE_M} "
            f"(got M={m}); use method 'exact'"
        )
    chunk = _chunk_rows(math.factorial(m) * m, s.element_size(), 8)
    return _RowwiseKL.apply(s, t, _soft_bruteforce_rows, chunk).mean()


class DarkRankLoss(nn.Module):
    """DarkRank between student and teacher embeddings of one minibatch.

    Each sample is a query. ``list_size=None`` (the paper): its candidates are all the other samples
    of the batch. ``list_size=M``: only the M samples the teacher ranks closest; Plackett-Luce on
    such a cut list cannot see the others, so a student that pulls an outside sample in front of
    them is not penalised. ``topk=k`` (hard mode) is ListMLE@k over the whole candidate list: the
    cheaper way to focus on the head of the ranking that still penalises that.
    Scores are ``-alpha * ||q - x||^beta`` in each model's own embedding space (dimensions may
    differ); the teacher side never receives gradients. Soft mode: ``method`` and ``num_samples``
    as in :func:`soft_darkrank` (exact needs at most 20 candidates per query).
    Defaults alpha = beta = 3 follow the DarkRank paper.
    """

    def __init__(
        self,
        alpha: float = 3.0,
        beta: float = 3.0,
        mode: str = "soft",
        list_size: int | None = None,
        method: str = "exact",
        num_samples: int = 128,
        topk: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise DistillError(f"unknown DarkRank mode {mode!r}; choose one of {', '.join(MODES)}")
        if method not in METHODS:
            raise DistillError(f"unknown DarkRank method {method!r}; choose one of {', '.join(METHODS)}")
        if not (alpha > 0 and beta > 0):
            raise DistillError(f"DarkRank alpha and beta must be > 0; got alpha={alpha}, beta={beta}")
        if list_size is not None and list_size < 1:
            raise DistillError(f"DarkRank list_size must be >= 1 (or None for all other samples); got {list_size}")
        if topk is not None and (topk < 1 or mode != "hard"):
            raise DistillError(f"DarkRank topk must be >= 1 and needs mode 'hard' (ListMLE@k); got topk={topk}, mode={mode!r}")
        if num_samples < 1:
            raise DistillError(f"DarkRank num_samples must be >= 1; got {num_samples}")
        self.alpha, self.beta, self.mode = alpha, beta, mode
        self.list_size, self.method, self.num_samples, self.topk = list_size, method, num_samples, topk

    def candidates(self, teacher_emb: Tensor) -> Tensor:
        """[N, M] indices of each query's candidates, nearest first by teacher distance."""
        n = teacher_emb.shape[0]
        if n < 2:
            raise DistillError(f"DarkRank needs a batch of at least 2 samples (got {n})")
        m = n - 1 if self.list_size is None else self.list_size
        if m >= n:
            raise DistillError(
                f"DarkRank list_size={m} needs a batch of at least {m + 1} samples (got {n}); "
                f"use a larger batch or a smaller --darkrank-list-size"
            )
        dist = torch.cdist(teacher_emb, teacher_emb).fill_diagonal_(float("inf"))
        return dist.sort(dim=1, stable=True).indices[:, :m]

    @full_precision
    def forward(self, student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
        check_pair(student_emb, teacher_emb, "DarkRankLoss")
        teacher = teacher_emb.detach()
        idx = self.candidates(teacher)
        # all pairs, then each row's candidates: a row-wise gather is summed in a fixed order on
        # the backward pass (indexing student[idx] accumulates with atomics on a multi-threaded CPU)
        s = darkrank_scores(student_emb, student_emb, self.alpha, self.beta).gather(1, idx)
        t = darkrank_scores(teacher, teacher, self.alpha, self.beta).gather(1, idx)
        if self.mode == "hard":
            return hard_darkrank(s, t, self.topk)
        return soft_darkrank(s, t, self.method, self.num_samples)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, mode={self.mode!r}, list_size={self.list_size}, "
            f"method={self.method!r}, num_samples={self.num_samples}, topk={self.topk}"
        )


@register_loss(
    "darkrank", kind="distill",
    defaults={
        "darkrank": "hard", "darkrank_alpha": 3.0, "darkrank_beta": 3.0, "darkrank_list_size": None,
        "darkrank_topk": None, "darkrank_method": "exact", "darkrank_samples": 128,
    },
    needs=("teacher_emb",),
)
class DarkRank(nn.Module):
    """DarkRank: each sample's neighbours ranked as the teacher ranks them (hard: ListMLE, soft: KL over rankings)"""

    def __init__(
        self, darkrank: str, darkrank_alpha: float, darkrank_beta: float, darkrank_list_size: int | None,
        darkrank_topk: int | None, darkrank_method: str, darkrank_samples: int,
    ) -> None:
        super().__init__()  # every value is checked by DarkRankLoss
        self.loss = DarkRankLoss(
            darkrank_alpha, darkrank_beta, mode=darkrank, list_size=darkrank_list_size, method=darkrank_method,
            num_samples=darkrank_samples, topk=darkrank_topk,
        )

    def forward(self, x: LossInputs) -> Tensor:
        loss = self.loss(x.emb, x.teacher_emb)
        if self.loss.list_size is not None or self.loss.topk is not None:
            return loss  # a list of fixed length: unlabeled rows do not lengthen it
        return loss * self.labeled_share(x.labels).to(loss.dtype)

    @staticmethod
    def labeled_share(labels: Tensor) -> Tensor:
        """The weight of a full list is meant for the labeled batch: its Plackett-Luce loss has one factor
        per candidate, so unlabeled rows (label -1, ``--unlabeled``) that lengthen every list raise the
        term with their number (log 127! / log 63! = 2.4x at 64 + 64 rows and uniform scores). A batch
        of both is scaled by labeled rows / all rows; a batch all labeled or all unlabeled by 1."""
        labeled = (labels >= 0).sum(dtype=torch.float64)
        return torch.where(labeled > 0, labeled / labels.numel(), 1.0)
