"""Task losses of distill.losses.metric against slow loop references (float64), PML, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners, reducers

from distill.errors import DistillError
from distill.losses.metric import (
    LargeMarginSoftmax,
    VerificationHead,
    batch_n_pair_loss,
    batch_triplet_loss,
    l2_weight_penalty,
    large_margin_logits,
    lifted_structured_loss,
    log_ratio_loss,
    n_pair_loss,
    softmax_loss,
    triplet_loss,
    verification_loss,
)

SEEDS = [0, 1, 2]


def batch(seed: int, n: int = 10, d: int = 4, ties: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float64 embeddings with classes of several sizes, one of size 1, and (optionally)
    duplicated rows and equal distances (ties)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,), generator=g)
    labels[-1] = 7  # a class of size 1
    if ties:
        emb[1] = emb[0]  # a duplicate point
        emb[3] = -emb[2]  # equal norms -> ties in distances to the origin-symmetric pair
    return emb, labels


def sq(x, i, j):
    return ((x[i] - x[j]) ** 2).sum()


# ---------------------------------------------------------------- references (explicit loops)


def ref_triplet_all(x, y, margin):
    vals = [
        torch.relu(margin + sq(x, a, p) - sq(x, a, n))
        for a in range(len(y))
        for p in range(len(y))
        for n in range(len(y))
        if a != p and y[a] == y[p] and y[n] != y[a]
    ]
    return torch.stack(vals).mean() if vals else x.sum() * 0


def ref_triplet_hard(x, y, margin):
    vals = []
    for a in range(len(y)):
        ps = [sq(x, a, p) for p in range(len(y)) if p != a and y[p] == y[a]]
        ns = [sq(x, a, n) for n in range(len(y)) if y[n] != y[a]]
        if ps and ns:
            vals.append(torch.relu(margin + max(ps) - min(ns)))
    return torch.stack(vals).mean() if vals else x.sum() * 0


def ref_triplet_semihard(x, y, margin):
    vals = []
    for a in range(len(y)):
        ns = [sq(x, a, n) for n in range(len(y)) if y[n] != y[a]]
        for p in range(len(y)):
            if p == a or y[p] != y[a] or not ns:
                continue
            d_ap = sq(x, a, p)
            beyond = [d for d in ns if d > d_ap]
            d_an = min(beyond) if beyond else max(ns)
            vals.append(torch.relu(margin + d_ap - d_an))
    return torch.stack(vals).mean() if vals else x.sum() * 0


REF_TRIPLET = {"all": ref_triplet_all, "hard": ref_triplet_hard, "semihard": ref_triplet_semihard}


def ref_lifted(x, y, margin):
    def dist(i, j):
        return torch.sqrt(sq(x, i, j))

    vals = []
    for i in range(len(y)):
        for j in range(i + 1, len(y)):
            if y[i] != y[j]:
                continue
            s = sum(torch.exp(margin - dist(i, k)) for k in range(len(y)) if y[k] != y[i])
            s = s + sum(torch.exp(margin - dist(j, k)) for k in range(len(y)) if y[k] != y[j])
            if isinstance(s, int):  # no negatives at all
                continue
            vals.append(torch.relu(torch.log(s) + dist(i, j)) ** 2)
    return sum(vals) / (2 * len(vals)) if vals else x.sum() * 0


def ref_log_ratio(x, t, eps):
    t = t.reshape(len(t), -1)
    vals = []
    n = len(x)
    for a in range(n):
        for i in range(n):
            for j in range(n):
                if i == a or j == a or not sq(t, a, i) < sq(t, a, j):
                    continue
                r = (
                    torch.log(sq(x, a, i) + eps)
                    - torch.log(sq(x, a, j) + eps)
                    - torch.log(sq(t, a, i) + eps)
                    + torch.log(sq(t, a, j) + eps)
                )
                vals.append(r**2)
    return torch.stack(vals).mean() if vals else x.sum() * 0


def ref_verification(x, y, weight, bias, balanced):
    pos, neg = [], []
    for i in range(len(y)):
        for j in range(i + 1, len(y)):
            logits = weight @ (x[i] - x[j]) ** 2 + bias
            same = int(y[i] == y[j])
            ce = -(logits[same] - torch.logsumexp(logits, 0))
            (pos if same else neg).append(ce)
    if not balanced:
        return torch.stack(pos + neg).mean()
    groups = [torch.stack(g).mean() for g in (pos, neg) if g]
    return sum(groups) / len(groups)


def ref_lsoftmax(x, weight, y, m):
    vals = []
    for i in range(len(y)):
        logits = []
        for c in range(weight.shape[0]):
            wn, xn = weight[c].norm(), x[i].norm()
            cos = (weight[c] @ x[i]) / (wn * xn)
            if c == y[i]:
                theta = math.acos(max(-1.0, min(1.0, cos.item())))
                k = min(math.floor(theta * m / math.pi), m - 1)
                psi = (-1) ** k * torch.cos(m * torch.acos(cos.clamp(-1, 1))) - 2 * k
                logits.append(wn * xn * psi)
            else:
                logits.append(wn * xn * cos)
        logits = torch.stack(logits)
        vals.append(-(logits[y[i]] - torch.logsumexp(logits, 0)))
    return torch.stack(vals).mean()


def ref_n_pair(x, y):
    anchors, positives = [], []
    for c in sorted(set(y.tolist())):
        members = [i for i in range(len(y)) if y[i] == c]
        if len(members) >= 2:
            anchors.append(members[0])
            positives.append(members[1])
    vals = []
    for i, a in enumerate(anchors):
        s = sum(torch.exp(x[a] @ x[positives[j]] - x[a] @ x[positives[i]]) for j in range(len(anchors)) if j != i)
        vals.append(torch.log(1 + s))
    return torch.stack(vals).mean() if vals else x.sum() * 0


# ---------------------------------------------------------------- triplet


@pytest.mark.parametrize("seed", SEEDS)
def test_triplet_loss_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    a, p, n = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    ref = torch.stack([torch.relu(0.3 + ((a[i] - p[i]) ** 2).sum() - ((a[i] - n[i]) ** 2).sum()) for i in range(7)]).mean()
    torch.testing.assert_close(triplet_loss(a, p, n, 0.3), ref)


def test_triplet_loss_bad_shapes():
    with pytest.raises(DistillError, match="same shape"):
        triplet_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2, 2), 0.1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
def test_batch_triplet_matches_loop(seed, mining):
    x, y = batch(seed)
    torch.testing.assert_close(batch_triplet_loss(x, y, 1.5, mining), REF_TRIPLET[mining](x, y, 1.5))
    x, y = batch(seed, ties=False)  # gradients: away from ties, where max/min pick one subgradient
    x.requires_grad_(True)
    got, ref = batch_triplet_loss(x, y, 1.5, mining), REF_TRIPLET[mining](x, y, 1.5)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(ref, x)[0])


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_triplet_matches_pml(seed):
    x, y = batch(seed)
    dist = distances.LpDistance(power=2, normalize_embeddings=False)
    pml_all = losses.TripletMarginLoss(margin=1.5, distance=dist, reducer=reducers.MeanReducer())
    torch.testing.assert_close(batch_triplet_loss(x, y, 1.5, "all"), pml_all(x, y))
    hard = miners.BatchHardMiner(distance=dist)(x, y)
    torch.testing.assert_close(batch_triplet_loss(x, y, 1.5, "hard"), pml_all(x, y, hard))


@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
def test_batch_triplet_gradcheck(mining):
    x, y = batch(5, n=7, d=3, ties=False)
    assert torch.autograd.gradcheck(lambda e: batch_triplet_loss(e, y, 2.0, mining), (x.requires_grad_(),))


@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
def test_batch_triplet_without_positives_or_negatives_is_zero(mining):
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    for y in (torch.arange(5), torch.zeros(5, dtype=torch.long)):  # no positive pair / no negative
        loss = batch_triplet_loss(x, y, 0.5, mining)
        (grad,) = torch.autograd.grad(loss, x)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(x))


def test_batch_triplet_bad_input():
    with pytest.raises(DistillError, match="one entry per embedding"):
        batch_triplet_loss(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), 0.1)
    with pytest.raises(DistillError, match="integer class indices"):
        batch_triplet_loss(torch.zeros(4, 2), torch.zeros(4), 0.1)
    with pytest.raises(DistillError, match="unknown triplet mining 'easy'"):
        batch_triplet_loss(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 0.1, "easy")


def test_l2_weight_penalty():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    ref = 1e-3 * sum((m.weight**2).sum() for m in (net[0], net[2]))
    torch.testing.assert_close(l2_weight_penalty(net.parameters()), ref)
    with pytest.raises(DistillError, match="no weight matrices"):
        l2_weight_penalty(torch.nn.BatchNorm1d(3).parameters())


# ---------------------------------------------------------------- lifted


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("margin", [1.0, 3.0])
def test_lifted_matches_loop_and_pml(seed, margin):
    x, y = batch(seed)
    x.requires_grad_(True)
    got = lifted_structured_loss(x, y, margin)
    ref = ref_lifted(x, y, margin)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)  # the 1e-12 clamp moves a tie's D by 1e-6
    pml = losses.LiftedStructureLoss(
        neg_margin=margin, pos_margin=0, distance=distances.LpDistance(power=1, normalize_embeddings=False)
    )
    torch.testing.assert_close(got, pml(x, y), rtol=1e-6, atol=1e-5)
    (grad,) = torch.autograd.grad(got, x)
    assert torch.isfinite(grad).all()


def test_lifted_gradcheck_and_grad_matches_loop():
    x, y = batch(4, n=7, d=3, ties=False)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: lifted_structured_loss(e, y, 2.0), (x,))
    g_ref = torch.autograd.grad(ref_lifted(x, y, 2.0), x)[0]
    torch.testing.assert_close(torch.autograd.grad(lifted_structured_loss(x, y, 2.0), x)[0], g_ref)


def test_lifted_without_pairs_is_zero():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for y in (torch.arange(4), torch.zeros(4, dtype=torch.long)):
        loss = lifted_structured_loss(x, y)
        (grad,) = torch.autograd.grad(loss, x)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(x))


# ---------------------------------------------------------------- log-ratio


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tdim", [None, 3])
def test_log_ratio_matches_loop(seed, tdim):
    x, _ = batch(seed, n=7)
    g = torch.Generator().manual_seed(100 + seed)
    shape = (7,) if tdim is None else (7, tdim)
    t = torch.randint(0, 3, shape, generator=g).double()  # integer targets: many tied label distances
    x.requires_grad_(True)
    got = log_ratio_loss(x, t)
    ref = ref_log_ratio(x, t, 1e-6)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(ref, x)[0])


def test_log_ratio_gradcheck():
    x, _ = batch(3, n=6, d=3, ties=False)
    t = torch.randn(6, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda e: log_ratio_loss(e, t), (x.requires_grad_(),))


def test_log_ratio_degenerate_and_bad_input():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    loss = log_ratio_loss(x, torch.ones(5))  # all targets equal: no ranked triplet
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(x))
    with pytest.raises(DistillError, match="same N"):
        log_ratio_loss(x, torch.ones(4))


# ---------------------------------------------------------------- softmax, verification, L-Softmax


def test_softmax_loss():
    logits, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    ref = torch.stack([-(logits[i, y[i]] - torch.logsumexp(logits[i], 0)) for i in range(6)]).mean()
    torch.testing.assert_close(softmax_loss(logits, y), ref)
    with pytest.raises(DistillError, match="one entry per embedding"):
        softmax_loss(logits, y[:5])
    eps, c = 0.1, logits.shape[1]  # label smoothing: the target puts eps / C on every class
    smoothed = torch.stack([-sum(((1 - eps) * (j == y[i]) + eps / c) * torch.log_softmax(logits[i], 0)[j] for j in range(c))
                            for i in range(6)]).mean()
    torch.testing.assert_close(softmax_loss(logits, y, smoothing=eps), smoothed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("balanced", [True, False])
def test_verification_matches_loop(seed, balanced):
    x, y = batch(seed)
    head = VerificationHead(x.shape[1]).double()
    x.requires_grad_(True)
    got = verification_loss(x, y, head, balanced)
    ref = ref_verification(x, y, head.fc.weight, head.fc.bias, balanced)
    torch.testing.assert_close(got, ref)
    params = (x, head.fc.weight, head.fc.bias)
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b)


def test_verification_one_sided_batches():
    head = VerificationHead(3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    for y in (torch.arange(4), torch.zeros(4, dtype=torch.long)):  # only negative / only positive pairs
        torch.testing.assert_close(verification_loss(x, y, head), ref_verification(x, y, head.fc.weight, head.fc.bias, True))
    assert verification_loss(x[:1], y[:1], head).item() == 0.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_lsoftmax_matches_loop(seed, m):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (8,), generator=g)
    got = F.cross_entropy(large_margin_logits(x, w, y, m), y)
    ref = ref_lsoftmax(x, w, y, m)
    torch.testing.assert_close(got, ref)
    for a, b in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(ref, (x, w))):
        torch.testing.assert_close(a, b)


def test_lsoftmax_m1_is_softmax():
    torch.manual_seed(0)
    module = LargeMarginSoftmax(6, 5, margin=1).double()
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (9,))
    got = module(x, y)
    ref = F.cross_entropy(x @ module.weight.T, y)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(ref, x)[0])


def test_lsoftmax_gradcheck_and_margin_lowers_target():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: large_margin_logits(a, b, y, 3, lam=0.5), (x, w))
    plain = (x @ w.T).gather(1, y[:, None])
    for m in (2, 3, 4):  # psi(theta) <= cos(theta): the margin only ever makes the target harder
        assert (large_margin_logits(x, w, y, m).gather(1, y[:, None]) <= plain + 1e-12).all()


def test_lsoftmax_bad_margin():
    with pytest.raises(DistillError, match="integer >= 1"):
        large_margin_logits(torch.zeros(2, 3), torch.ones(4, 3), torch.zeros(2, dtype=torch.long), 0)


# ---------------------------------------------------------------- N-pair


@pytest.mark.parametrize("seed", SEEDS)
def test_n_pair_matches_loop_and_pml(seed):
    x, y = batch(seed, n=12)
    x.requires_grad_(True)
    got = batch_n_pair_loss(x, y)
    ref = ref_n_pair(x, y)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(ref, x)[0])
    pml = losses.NPairsLoss(distance=distances.DotProductSimilarity(normalize_embeddings=False))
    torch.testing.assert_close(got, pml(x, y))


def test_n_pair_per_anchor_candidates_equal_shared_positives():
    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(n_pair_loss(a, p.expand(5, 5, 3)), n_pair_loss(a, p))


def test_n_pair_degenerate_and_bad_input():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss = batch_n_pair_loss(x, torch.arange(4))  # no positive pair
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(x))
    with pytest.raises(DistillError, match="positives"):
        n_pair_loss(torch.zeros(3, 2), torch.zeros(2, 2))


def test_n_pair_scale_lets_separated_classes_reach_zero():
    """16 perfectly separated classes on the unit sphere (orthonormal, anchor = positive): Sohn's
    unscaled form still costs log(1 + 15 / e) = 1.87; the scale brings it to log(1 + 15 e^-s)."""
    e = torch.eye(16, dtype=torch.float64)
    assert n_pair_loss(e, e).item() == pytest.approx(math.log(1 + 15 / math.e), rel=1e-12)
    assert n_pair_loss(e, e, scale=16.0).item() == pytest.approx(math.log(1 + 15 * math.exp(-16)), rel=1e-9)
    assert n_pair_loss(e, e, scale=16.0).item() < 1e-5
    labels = torch.arange(16).repeat(2)
    assert batch_n_pair_loss(torch.cat([e, e]), labels, scale=16.0).item() < 1e-5
    with pytest.raises(DistillError, match="scale must be > 0, got -1"):
        n_pair_loss(e, e, scale=-1.0)
