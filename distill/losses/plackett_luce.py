"""Per-row KL(P_t || P_s) between the Plackett-Luce ranking distributions of teacher and student
scores, with its student gradient, for soft DarkRank (:mod:`distill.losses.darkrank`, whose
docstring derives the subset DP): exact by the subset DP (in probabilities, or in log space for
rows with a wide score spread), by enumerating all M! rankings (the reference), and two unbiased
estimates from sampled teacher rankings. Rows are ``[rows, M]`` scores; each function returns
``(kl per row, its gradient with respect to the student scores or None)``, and :class:`_RowwiseKL`
turns such a function into an autograd op that runs chunk by chunk of rows.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Working memory one chunk of queries may use; the loss loops over chunks of queries so that the
# peak stays near this whatever Q is (M=16, Q=64: two chunks).
_CHUNK_BYTES = 128 * 2**20

RowsFn = Callable[[Tensor, Tensor, bool], "tuple[Tensor, Tensor | None]"]


def _log_plackett_luce(last_first: Tensor) -> Tensor:
    """log P(pi | s) of rankings given by their scores listed from last-ranked to first [..., M]:
    the item at position i is chosen from itself and all before it in this order."""
    return (last_first - last_first.logcumsumexp(-1)).sum(-1)


# Exact soft DarkRank runs in plain probabilities (no logs or exps per subset) when each row's
# score spread (max - min) keeps every ``exp(score - max)`` and ``1 / sum`` in range: in float32
# up to F32_SPREAD, in float64 up to F64_SPREAD; wider rows use the log-space DP.
F32_SPREAD = 60.0
F64_SPREAD = 600.0
_EXACT_CHUNK_BYTES = 8 * 2**20  # working set of one chunk of rows in the probability DP (stays in cache)


@lru_cache(maxsize=16)
def _layer_plan(m: int, device: torch.device, dtype: torch.dtype) -> tuple[tuple[int, ...], tuple[Tensor, ...], Tensor]:
    """Index tensors of the probability DP, with the non-empty subsets of range(m) in *layer order*
    (by size, then bitmask; the empty set would be position 0 and is left out):

    - ``starts[k]``: position of the first subset of size k (layer k is ``starts[k]:starts[k + 1]``);
    - ``pairs[k]`` for 1 <= k < m: [2, C(m,k) * (m-k)], per subset S of size k and per j not in S
      (S-major, j ascending) the position of S + {j} (row 0) and j (row 1);
    - ``members``: [2^m - 1, m] 0/1 matrix, subset x candidate (sums over subsets are matmuls).
    """
    masks = torch.arange(2**m)
    ids = torch.arange(m)
    size = ((masks[:, None] >> ids) & 1).sum(1)
    order = torch.argsort(size * 2**m + masks)  # layer position -> bitmask
    position = torch.empty_like(order)
    position[order] = torch.arange(2**m) - 1  # bitmask -> position without the empty set
    starts = tuple(itertools.accumulate((math.comb(m, k) for k in range(m + 1)), initial=-1))
    bit = 1 << ids
    pairs = [torch.empty(0)]
    for k in range(1, m):
        layer = order[starts[k] + 1 : starts[k + 1] + 1]
        outside = (layer[:, None] & bit) == 0
        parent = position[(layer[:, None] | bit)[outside]]
        pairs.append(torch.stack([parent, ids.expand_as(outside)[outside]]).to(device))
    members = ((order[1:, None] >> ids) & 1).to(device=device, dtype=dtype)
    return starts, tuple(pairs), members


def _soft_exact_rows(s: Tensor, t: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Exact KL(P_t || P_s) per row by the subset DP (:mod:`distill.losses.darkrank`'s docstring); also its student gradient.

    Rows whose scores fit the probability DP (:data:`F32_SPREAD`, :data:`F64_SPREAD`) go through
    :func:`_soft_exact_probs` in chunks that stay in cache; the others through the log-space DP.
    """
    spread = torch.maximum(s.amax(1) - s.amin(1), t.amax(1) - t.amin(1))
    fast = spread <= F64_SPREAD
    if not bool(fast.all()):
        kl, grad = s.new_empty(s.shape[0]), s.new_empty(s.shape) if need_grad else None
        for rows, fn in ((fast, _soft_exact_probs), (~fast, _soft_exact_log)):
            if bool(rows.any()):
                kl[rows], g = fn(s[rows], t[rows], need_grad)
                if grad is not None:
                    grad[rows] = g
        return kl, grad
    dtype = torch.float32 if s.dtype == torch.float32 and float(spread.max()) <= F32_SPREAD else torch.float64
    return _soft_exact_probs(s, t, need_grad, dtype)


def _soft_exact_probs(s: Tensor, t: Tensor, need_grad: bool, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor | None]:
    """The subset DP in probabilities (computed in ``dtype``, returned in ``s``'s dtype).

    With ``e = exp(score - max)`` and ``Z(S) = sum_{j in S} e_j`` (one matmul over all subsets),
    ``q(S) = sum_{j not in S} r(S + j) * e_j`` where ``r = q / Z_t``: per layer of subset size
    one gather of r, one of e, a product and a sum. Then, over the non-empty subsets,
    ``KL = sum_j (t_j - s_j) + sum_S q(S) log(Z_s(S) / Z_t(S))`` and
    ``dKL/ds_j = e^s_j * sum_{S containing j} q(S) / Z_s(S) - 1`` (one matmul).
    """
    m = s.shape[1]
    starts, pairs, members = _layer_plan(m, s.device, dtype)
    chunk = max(1, _EXACT_CHUNK_BYTES // (math.comb(m, m // 2) * (m - m // 2) * members.element_size()))
    kls, grads = [], []
    for i in range(0, s.shape[0], chunk):
        sc, tc = s[i : i + chunk].to(dtype), t[i : i + chunk].to(dtype)
        sc, tc = sc - sc.amax(1, keepdim=True), tc - tc.amax(1, keepdim=True)
        es, et = sc.exp().T.contiguous(), tc.exp().T.contiguous()  # [m, rows]
        zs, zt = members @ es, members @ et  # [2^m - 1, rows]
        q, r = torch.empty_like(zt), torch.empty_like(zt)
        q[-1] = 1.0
        r[-1] = 1.0 / zt[-1]
        for k in range(m - 1, 0, -1):
            a, b = starts[k], starts[k + 1]
            parent, outside = pairs[k]
            terms = r.index_select(0, parent)
            terms *= et.index_select(0, outside)
            torch.sum(terms.view(b - a, m - k, -1), 1, out=q[a:b])
            torch.div(q[a:b], zt[a:b], out=r[a:b])
        kls.append((tc - sc).sum(1) + (q * (zs / zt).log_()).sum(0))
        if need_grad:
            grads.append((es * (members.T @ (q / zs))).T - 1.0)
    kl = torch.cat(kls).to(s.dtype)
    return kl, torch.cat(grads).to(s.dtype) if need_grad else None


@lru_cache(maxsize=8)
def _subset_layers(m: int, device: torch.device) -> tuple[Tensor, ...]:
    """Bitmasks of the subsets of range(m), one tensor per subset size 0..m (ascending masks)."""
    masks = torch.arange(2**m, device=device)
    size = sum((masks >> j) & 1 for j in range(m))
    return tuple(masks[size == k] for k in range(m + 1))


def _chunk_rows(per_row_elements: int, itemsize: int, live_tensors: int) -> int:
    return max(1, _CHUNK_BYTES // (per_row_elements * itemsize * live_tensors))


def _subset_logsumexp(scores: Tensor) -> Tensor:
    """[2^M, rows] table of logsumexp over every subset (row = bitmask), built by doubling:
    lse(S + j) = logaddexp(lse(S), x_j), so the subsets with bit j are appended after those without."""
    table = scores.new_full((1, scores.shape[1]), float("-inf"))
    for x in scores:
        table = torch.cat([table, torch.logaddexp(table, x)])
    return table


def _soft_exact_log(s: Tensor, t: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """The subset DP in log space, for rows whose score spread is too wide for probabilities.

    Subsets are processed layer by layer from size M down to 2 (a singleton's step is certain and
    adds nothing). Tables are [2^M, rows], indexed by bitmask, rows last so that every gather is
    a contiguous row copy; inside a layer every op is a tensor op over (subsets, members, rows).
    """
    rows, m = s.shape
    s, t = s.T.contiguous(), t.T.contiguous()  # [m, rows]
    lse_s, lse_t = _subset_logsumexp(s), _subset_logsumexp(t)
    ids = torch.arange(m, device=s.device)
    bit = 1 << ids
    q = s.new_zeros(2**m, rows)
    q[-1] = 1.0
    kl = s.new_zeros(rows)
    grad = torch.zeros_like(s) if need_grad else None
    layers = _subset_layers(m, s.device)
    for k in range(m, 1, -1):
        masks = layers[k]
        inside = (masks[:, None] & bit) != 0
        members = ids.expand_as(inside)[inside]  # [C * k] candidates of each subset, subset-major
        if k < m:  # q(S) = sum_{j not in S} q(S + j) * softmax(t_{S+j})_j
            outside = ids.expand_as(inside)[~inside].view(-1, m - k)
            parents = (masks[:, None] | bit[outside]).flatten()  # bitmasks of S + j
            log_p = t.index_select(0, outside.flatten()) - lse_t.index_select(0, parents)
            q_s = (q.index_select(0, parents) * log_p.exp()).view(-1, m - k, rows).sum(1)
            q.index_copy_(0, masks, q_s)
        else:
            q_s = q[masks]
        shape = (-1, k, rows)
        log_pt = t.index_select(0, members).view(shape) - lse_t.index_select(0, masks)[:, None]
        log_ps = s.index_select(0, members).view(shape) - lse_s.index_select(0, masks)[:, None]
        pt = log_pt.exp()
        kl += (q_s * (pt * (log_pt - log_ps)).sum(1)).sum(0)
        if grad is not None:
            grad.index_add_(0, members, (q_s[:, None] * (log_ps.exp() - pt)).view(-1, rows))
    return kl, None if grad is None else grad.T


@lru_cache(maxsize=4)
def _permutations(m: int, device: torch.device) -> Tensor:
    return torch.tensor(list(itertools.permutations(range(m))), device=device)


def _soft_bruteforce_rows(s: Tensor, t: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """KL(P_t || P_s) per row by enumerating all M! rankings (the paper's way; reference).
    Each permutation is read last-ranked first, which enumerates the same set of rankings."""
    perms = _permutations(s.shape[1], s.device)
    with torch.enable_grad():
        s = s.detach().requires_grad_(need_grad)
        log_pt = _log_plackett_luce(t[:, perms])
        kl = (log_pt.exp() * (log_pt - _log_plackett_luce(s[:, perms]))).sum(-1)
        grad = torch.autograd.grad(kl.sum(), s)[0] if need_grad else None
    return kl.detach(), grad


class _RowwiseKL(torch.autograd.Function):
    """Per-row KL whose student gradient is computed with the value, chunk by chunk of rows,
    so memory stays at one chunk's working set instead of an autograd graph over all rows."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, rows_fn: RowsFn, chunk: int) -> Tensor:  # type: ignore[override]
        need_grad = ctx.needs_input_grad[0]
        parts = [rows_fn(s[i : i + chunk], t[i : i + chunk], need_grad) for i in range(0, s.shape[0], chunk)]
        if need_grad:
            ctx.save_for_backward(torch.cat([g for _, g in parts]))
        return torch.cat([kl for kl, _ in parts])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad_out[:, None] * grad, None, None, None


def _soft_sampled(s: Tensor, t: Tensor, num_samples: int) -> Tensor:
    """Monte-Carlo KL: mean of ``log P_t(pi) - log P_s(pi)`` over rankings pi ~ P_t.

    pi is drawn by Gumbel-top-k (sorting t + Gumbel noise is an exact Plackett-Luce sample).
    The sampling does not depend on s, so the estimate and its student gradient are unbiased.
    """
    gumbel = -torch.empty(t.shape[0], num_samples, t.shape[1], dtype=t.dtype, device=t.device).exponential_().log()
    order = (t[:, None, :] + gumbel).argsort(dim=-1)  # last-ranked first
    t_ranked = t[:, None, :].expand_as(order).gather(-1, order)
    s_ranked = s[:, None, :].expand_as(order).gather(-1, order)
    return (_log_plackett_luce(t_ranked) - _log_plackett_luce(s_ranked)).mean(1)


def _soft_sampled_prefix_rows(s: Tensor, t: Tensor, need_grad: bool, num_samples: int) -> tuple[Tensor, Tensor | None]:
    """Per row, the mean over ``num_samples`` rankings pi ~ P_t (Gumbel-top-k) of the exact per-step
    KL summed along pi: ``sum_i KL(softmax(t_{S_i}) || softmax(s_{S_i}))``, S_i = {pi(i), ..., pi(M)}.

    By the chain rule of KL, E_pi[sum_i KL_i] = sum_S q(S) KL_S = KL(P_t || P_s): unbiased, and only
    the sets are random, not the per-step terms. In last-first order the set of step i is a prefix,
    so all steps are one [rows, samples, prefix, member] tensor. Gradient:
    ``dKL/ds_j = mean over samples of sum_{S_i containing j} (softmax(s_{S_i})_j - softmax(t_{S_i})_j)``.
    """
    rows, m = s.shape
    gumbel = -torch.empty(rows, num_samples, m, dtype=t.dtype, device=t.device).exponential_().log()
    order = (t[:, None, :] + gumbel).argsort(dim=-1)  # last-ranked first: step sets are prefixes
    tt = t[:, None, :].expand_as(order).gather(-1, order)
    ss = s[:, None, :].expand_as(order).gather(-1, order)
    in_prefix = torch.ones(m, m, dtype=torch.bool, device=s.device).tril()  # [prefix end L, member j]
    log_pt = tt[..., None, :] - tt.logcumsumexp(-1)[..., :, None]  # [rows, samples, L, j]
    log_ps = ss[..., None, :] - ss.logcumsumexp(-1)[..., :, None]
    pt = torch.where(in_prefix, log_pt.exp(), 0.0)
    kl = torch.where(in_prefix, pt * (log_pt - log_ps), 0.0).sum((-1, -2)).mean(1)
    if not need_grad:
        return kl, None
    per_member = torch.where(in_prefix, log_ps.exp() - pt, 0.0).sum(-2)  # [rows, samples, j]
    grad = torch.zeros_like(ss).scatter_(-1, order, per_member).mean(1)
    return kl, grad
