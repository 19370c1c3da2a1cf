"""HDML: the augmentation, the triplet selection and the whole loss (values, running means and
where each gradient goes) against a loop reference in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.losses.hdml import HDMLLoss, hardness_aware_negatives, random_triplets

SEEDS = [0, 1, 2]


def ref_augment(z, zp, zn, lam):
    d_n, d_p = (zn - z).norm(), (zp - z).norm()
    if d_n > d_p:
        return z + (lam * d_n + (1 - lam) * d_p) / d_n * (zn - z)
    return zn


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_augmentation_matches_loop(seed, lam):
    g = torch.Generator().manual_seed(seed)
    z, zp, zn = torch.randn(3, 12, 4, generator=g, dtype=torch.float64)
    zn[:3] = z[:3] + 0.1 * (zp[:3] - z[:3])  # negatives already nearer than the positive: unchanged
    got = hardness_aware_negatives(z, zp, zn, lam)
    ref = torch.stack([ref_augment(z[i], zp[i], zn[i], lam) for i in range(12)])
    torch.testing.assert_close(got, ref)
    assert torch.equal(got[:3], zn[:3])
    d_new, d_p, d_n = ((t - z).norm(dim=1) for t in (got, zp, zn))
    harder = d_n > d_p
    assert harder.sum() >= 3
    expected = lam * d_n + (1 - lam) * d_p  # on the z -> z^- line, at this distance from z
    torch.testing.assert_close(d_new[harder], expected[harder])


def test_augmentation_gradcheck_and_ties():
    g = torch.Generator().manual_seed(0)
    z, zp, zn = (t.requires_grad_() for t in torch.randn(3, 5, 3, generator=g, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: hardness_aware_negatives(a, b, c, 0.4), (z, zp, zn))
    x = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    out = hardness_aware_negatives(x, x * 1.0, x * 1.0, 0.5)  # all three coincide: d = 0 everywhere
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_random_triplets_are_valid_and_cover_choices(seed):
    y = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(seed))
    y[-1] = 5  # a class of size 1: it can be a negative but never an anchor
    g = torch.Generator().manual_seed(seed)
    expected = [a for a in range(9) if sum(int(y[p] == y[a]) for p in range(9)) > 1]
    seen_p = set()
    for _ in range(60):
        a, p, n = random_triplets(y, g)
        assert a.tolist() == expected
        assert (y[a] == y[p]).all() and (a != p).all() and (y[a] != y[n]).all()
        seen_p.update(zip(a.tolist(), p.tolist()))
    assert seen_p == {(a, p) for a in expected for p in range(9) if p != a and y[p] == y[a]}


# ---------------------------------------------------------------- the whole loss vs a loop reference


def gen(module, v):
    out = module.generator(v)
    return out / out.norm(dim=-1, keepdim=True)


def ref_hdml(module, emb, labels, seed):
    """Loop reference. Returns J_metric, J_gen, J_cls (each with the gradient paths the paper uses)
    and the statistics."""
    lam = math.exp(-module.alpha / module.j_avg.item())
    w = math.exp(-module.beta / module.j_gen.item())
    W, b = module.classifier.weight, module.classifier.bias
    if module.base == "triplet":
        torch.manual_seed(seed)
        a, p, n = random_triplets(labels)
        triples = list(zip(a.tolist(), p.tolist(), n.tolist()))

        def tri(za, zp, zn):
            return torch.relu(module.margin + ((za - zp) ** 2).sum() - ((za - zn) ** 2).sum())

        hats = [ref_augment(emb[i], emb[j], emb[k], lam) for i, j, k in triples]
        j_real = torch.stack([tri(emb[i], emb[j], emb[k]) for i, j, k in triples]).mean()
        j_syn = torch.stack(
            [tri(gen(module, emb[i]), gen(module, emb[j]), gen(module, h)) for (i, j, _), h in zip(triples, hats)]
        ).mean()
        real = [emb[i] for t in triples for i in t]
        hat_members = [(emb[i], labels[i]) for i, _, _ in triples] + [(emb[j], labels[j]) for _, j, _ in triples]
        hat_members += [(h, labels[k]) for (_, _, k), h in zip(triples, hats)]
    else:
        classes = sorted(set(labels.tolist()))
        pairs = [[i for i in range(len(labels)) if labels[i] == c][:2] for c in classes]
        pairs = [pq for pq in pairs if len(pq) == 2]
        anc, pos = [emb[i] for i, _ in pairs], [emb[j] for _, j in pairs]
        k = len(pairs)
        hats = [[ref_augment(anc[i], pos[i], pos[j], lam) for j in range(k)] for i in range(k)]

        def npair(a_list, cand):
            vals = []
            for i in range(k):
                logits = torch.stack([a_list[i] @ cand[i][j] for j in range(k)])
                vals.append(torch.logsumexp(logits, 0) - logits[i])
            return torch.stack(vals).mean()

        j_real = npair(anc, [pos] * k)
        j_syn = npair([gen(module, a) for a in anc], [[gen(module, h) for h in row] for row in hats])
        real = anc + pos
        hat_members = [(a, labels[i]) for a, (i, _) in zip(anc, pairs)]
        hat_members += [(hats[i][j], labels[pairs[j][1]]) for i in range(k) for j in range(k)]
    j_metric = w * j_real + (1 - w) * j_syn
    j_recon = torch.stack([((gen(module, r.detach()) - r.detach()) ** 2).sum() for r in real]).mean()
    ce = [
        torch.logsumexp(W.detach() @ gen(module, h.detach()) + b.detach(), 0)
        - (W.detach() @ gen(module, h.detach()) + b.detach())[c]
        for h, c in hat_members
    ]
    j_gen = j_recon + module.soft_weight * torch.stack(ce).mean()
    j_cls = torch.stack(
        [torch.logsumexp(W @ emb[i].detach() + b, 0) - (W @ emb[i].detach() + b)[labels[i]] for i in range(len(labels))]
    ).mean()
    stats = {"real": j_real, "syn": j_syn, "gen": j_gen, "cls": j_cls, "lambda": lam, "w_real": w}
    return j_metric, j_gen, j_cls, {k: float(torch.as_tensor(v).detach()) for k, v in stats.items()}


def check_step(module, emb, labels, seed):
    """One forward: value, statistics and the gradient of every parameter group vs the reference."""
    gen_params, cls_params = list(module.generator.parameters()), list(module.classifier.parameters())
    j_metric, j_gen, j_cls, ref_stats = ref_hdml(module, emb, labels, seed)
    torch.manual_seed(seed)
    loss, stats = module(emb, labels)
    torch.testing.assert_close(loss, j_metric + j_gen + j_cls)
    assert stats.keys() == ref_stats.keys()
    for key in stats:
        assert stats[key] == pytest.approx(ref_stats[key], rel=1e-5, abs=1e-6), key
    got = torch.autograd.grad(loss, [emb, *gen_params, *cls_params])
    ref = [
        *torch.autograd.grad(j_metric, [emb]),  # the metric loss reaches only the embedding
        *torch.autograd.grad(j_gen, gen_params),  # the generator learns only from J_gen
        *torch.autograd.grad(j_cls, cls_params),  # the classifier only from real embeddings
    ]
    for g_got, g_ref in zip(got, ref):
        torch.testing.assert_close(g_got, g_ref)
    return ref_stats


@pytest.mark.parametrize("base", ["triplet", "npair"])
@pytest.mark.parametrize("seed", SEEDS)
def test_hdml_matches_loop_reference_over_two_steps(base, seed):
    torch.manual_seed(seed)
    module = HDMLLoss(4, 6, base=base, margin=0.3, beta=2.0, soft_weight=0.7, decay=0.9).double()
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 5])  # class 3 and 5 of size 1
    emb1 = F.normalize(torch.randn(9, 4, dtype=torch.float64), dim=1).requires_grad_()
    s1 = check_step(module, emb1, labels, seed)
    assert s1["lambda"] == 1.0 and s1["w_real"] == 1.0  # running means start at +inf: real tuples only
    assert module.j_avg.item() == pytest.approx(s1["real"]) and module.j_gen.item() == pytest.approx(s1["gen"])
    emb2 = F.normalize(torch.randn(9, 4, dtype=torch.float64), dim=1).requires_grad_()
    s2 = check_step(module, emb2, labels, seed + 10)
    assert 0.0 < s2["lambda"] < 1.0 and 0.0 < s2["w_real"] < 1.0
    assert module.j_avg.item() == pytest.approx(0.9 * s1["real"] + 0.1 * s2["real"])
    assert module.j_gen.item() == pytest.approx(0.9 * s1["gen"] + 0.1 * s2["gen"])


def test_hdml_eval_mode_keeps_running_means():
    module = HDMLLoss(4, 3)
    emb = F.normalize(torch.randn(6, 4), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    module(emb, labels)
    before = (module.j_avg.clone(), module.j_gen.clone())
    module.eval()
    module(emb, labels)
    assert torch.equal(module.j_avg, before[0]) and torch.equal(module.j_gen, before[1])
    assert set(module.state_dict()) >= {"j_avg", "j_gen"}


@pytest.mark.parametrize("base", ["triplet", "npair"])
def test_hdml_batch_without_tuples_is_finite(base):
    module = HDMLLoss(3, 4, base=base)
    emb = F.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    loss, stats = module(emb, torch.arange(4))  # no positive pair
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    assert stats["real"] == 0.0 and stats["syn"] == 0.0
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    assert math.isinf(module.j_avg.item())  # nothing learnt about the loss level from an empty batch


def test_hdml_defaults_and_bad_base():
    assert HDMLLoss(8, 3).alpha == 0.05 and HDMLLoss(8, 3, base="npair").alpha == 2.0
    assert [m.out_features for m in HDMLLoss(8, 3).generator if isinstance(m, torch.nn.Linear)] == [512, 1024, 8]
    with pytest.raises(DistillError, match="unknown HDML base loss 'lifted'"):
        HDMLLoss(8, 3, base="lifted")
    with pytest.raises(DistillError, match="one entry per embedding"):
        HDMLLoss(8, 3)(torch.zeros(4, 8), torch.zeros(3, dtype=torch.long))
