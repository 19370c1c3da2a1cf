"""The engine-facing task loss: spec grammar, weighting, learnable parts, errors, a short training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.losses.metric import (
    batch_n_pair_loss,
    batch_triplet_loss,
    large_margin_logits,
    lifted_structured_loss,
    log_ratio_loss,
    verification_loss,
)
from distill.losses.task import HPARAMS, build_task_loss, parse_loss_spec, task_loss_names

NAMES = ["softmax", "verification", "lsoftmax", "triplet", "lifted", "npair", "logratio", "hdml-triplet", "hdml-npair"]


def pk_batch(seed, p=4, k=3, d=8, c=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(c, generator=g)[:p].repeat_interleave(k)
    emb = F.normalize(torch.randn(p * k, d, generator=g, dtype=dtype), dim=1)
    logits = torch.randn(p * k, c, generator=g, dtype=dtype)
    teacher = torch.randn(p * k, 5, generator=g, dtype=dtype)
    return emb, logits, labels, teacher


def test_names():
    assert task_loss_names() == NAMES


def test_parse_spec():
    assert parse_loss_spec("softmax=1,triplet=1,lifted=0.5") == [("softmax", 1.0), ("triplet", 1.0), ("lifted", 0.5)]
    assert parse_loss_spec(" hdml-triplet , softmax = 2e-1 ") == [("hdml-triplet", 1.0), ("softmax", 0.2)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("softmax,contrastive=1", "unknown loss 'contrastive' .*valid names: softmax, verification, lsoftmax"),
        ("triplet=abc", "weight 'abc' for 'triplet' is not a number"),
        ("triplet=-1", "finite number >= 0"),
        ("triplet=nan", "finite number >= 0"),
        ("triplet=inf", "finite number >= 0"),
        ("", "malformed loss spec ''"),
        ("softmax,", "malformed loss spec"),
        ("triplet=", "malformed loss spec"),
        ("=1", "malformed loss spec"),
        ("softmax,softmax=2", "appears twice"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(DistillError, match=message):
        build_task_loss(spec, 8, 4)


def test_bad_hparams():
    with pytest.raises(DistillError, match="unknown task-loss hyper-parameter.*margin.*valid: softmax_smoothing, verification_balanced, lsoftmax_margin, lsoftmax_lambda, triplet_margin"):
        build_task_loss("triplet", 8, 4, margin=0.3)
    with pytest.raises(DistillError, match="triplet_mining must be one of all, hard, semihard"):
        build_task_loss("triplet", 8, 4, triplet_mining="easy")
    with pytest.raises(DistillError, match="lsoftmax_margin must be an integer >= 1"):
        build_task_loss("lsoftmax", 8, 4, lsoftmax_margin=1.5)
    with pytest.raises(DistillError, match="npair_scale must be > 0, got 0"):
        build_task_loss("npair", 8, 4, npair_scale=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_total_is_weighted_sum_of_the_losses(seed):
    emb, logits, labels, teacher = pk_batch(seed)
    spec = "softmax=1,verification=0.5,lsoftmax=0.25,triplet=2,lifted=0.5,npair=0.3,logratio=0.7"
    task = build_task_loss(spec, 8, 6, triplet_mining="semihard", triplet_margin=0.3, lsoftmax_margin=3).double()
    total, parts = task(emb, logits, labels, teacher_emb=teacher)
    ref = {
        "softmax": F.cross_entropy(logits, labels),
        "verification": verification_loss(emb, labels, task.losses["verification"].head),
        "lsoftmax": F.cross_entropy(large_margin_logits(emb, task.losses["lsoftmax"].classifier.weight, labels, 3), labels),
        "triplet": batch_triplet_loss(emb, labels, 0.3, "semihard"),
        "lifted": lifted_structured_loss(emb, labels, 1.0),
        "npair": batch_n_pair_loss(emb, labels, HPARAMS["npair_scale"]),
        "logratio": log_ratio_loss(emb, teacher),
    }
    weights = dict(parse_loss_spec(spec))
    torch.testing.assert_close(total, sum(weights[k] * v for k, v in ref.items()))
    assert list(parts) == list(ref)
    for k, v in ref.items():
        assert parts[k] == pytest.approx(v.item(), rel=1e-6)


def test_hdml_parts_are_logged_and_learnable_parts_are_parameters():
    task = build_task_loss("softmax,verification,lsoftmax,hdml-triplet,hdml-npair", 8, 6)
    names = {n.split(".")[1] for n, _ in task.named_parameters()}
    assert names == {"verification", "lsoftmax", "hdml-triplet", "hdml-npair"}
    assert {"losses.hdml-triplet.hdml.j_avg", "losses.hdml-npair.hdml.j_gen"} <= set(task.state_dict())
    emb, logits, labels, _ = pk_batch(0, dtype=torch.float32)
    total, parts = task(emb.requires_grad_(), logits, labels)
    total.backward()
    assert {"hdml-triplet.lambda", "hdml-npair.w_real", "hdml-triplet.gen"} <= set(parts)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in task.parameters())
    assert not list(build_task_loss("softmax,triplet,lifted,npair,logratio", 8, 6).parameters())


def test_logratio_needs_a_teacher():
    emb, logits, labels, teacher = pk_batch(0)
    task = build_task_loss("softmax,logratio", 8, 6)
    with pytest.raises(DistillError, match="logratio loss needs a teacher"):
        task(emb, logits, labels)
    with pytest.raises(DistillError, match="teacher_emb must be"):
        task(emb, logits, labels, teacher_emb=teacher[:3])


def test_bad_batches():
    emb, logits, labels, _ = pk_batch(0)
    task = build_task_loss("softmax,triplet", 8, 6)
    with pytest.raises(DistillError, match="one entry per embedding"):
        task(emb, logits, labels[:-1])
    with pytest.raises(DistillError, match="embedding width 4 does not match"):
        task(emb[:, :4], logits, labels)
    with pytest.raises(DistillError, match=r"logits must be \[N, num_classes\] = \[12, 6\]"):
        task(emb, logits[:, :5], labels)
    with pytest.raises(DistillError, match="class indices 0..5, got 0..9"):
        task(emb, logits, torch.where(labels == labels[0], 9, labels))


def test_batch_without_positive_pairs_gives_zero_metric_losses():
    emb, logits, _, _ = pk_batch(1)
    task = build_task_loss("triplet,lifted,npair", 8, 6)
    total, parts = task(emb[:6], logits[:6], torch.arange(6))  # six samples, six classes
    assert total.item() == 0.0 and parts == {"triplet": 0.0, "lifted": 0.0, "npair": 0.0}


def test_low_precision_inputs_are_computed_in_float32():
    emb, logits, labels, _ = pk_batch(2, dtype=torch.float32)
    task = build_task_loss("softmax,triplet,lifted", 8, 6)
    total16, _ = task(emb.bfloat16(), logits.bfloat16(), labels)
    total32, _ = task(emb.bfloat16().float(), logits.bfloat16().float(), labels)
    assert total16.dtype == torch.float32
    torch.testing.assert_close(total16, total32)


def test_weight_penalty():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    task = build_task_loss("verification", 8, 3, weight_l2=1e-3)
    ref = 1e-3 * sum((w**2).sum() for w in (model[0].weight, model[2].weight, task.losses["verification"].head.fc.weight))
    torch.testing.assert_close(task.weight_penalty(model), ref)
    assert HPARAMS["weight_l2"] == 0.0 and build_task_loss("softmax", 8, 3).weight_penalty(model).item() == 0.0


@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
def test_weight_penalty_matches_the_papers_lambda_next_to_a_mean(mining):
    """Deep Ranking minimises sum_triplets hinge + lambda ||W||^2. With the mean over the batch's T
    triplets, loss + penalty must be exactly that objective divided by T (T counted by a loop)."""
    emb, logits, labels, _ = pk_batch(3)
    model = torch.nn.Linear(4, 3).double()
    task = build_task_loss("triplet", 8, 6, weight_l2=1e-3, triplet_mining=mining).double()
    total, _ = task(emb, logits, labels)
    n = len(labels)
    pos = [(a, p) for a in range(n) for p in range(n) if a != p and labels[a] == labels[p]]
    has_neg = {a for a in range(n) if any(labels[x] != labels[a] for x in range(n))}
    count = {
        "all": sum(1 for a, p in pos for x in range(n) if labels[x] != labels[a]),
        "hard": sum(1 for a in range(n) if any(q == a for q, _ in pos) and a in has_neg),
        "semihard": sum(1 for a, _ in pos if a in has_neg),
    }[mining]
    w2 = model.weight.pow(2).sum()
    paper = count * total + 1e-3 * w2  # the paper's sum objective
    torch.testing.assert_close(total + task.weight_penalty(model), paper / count)
    softmax_only = build_task_loss("softmax", 8, 6, weight_l2=1e-3).double()
    softmax_only(emb, logits, labels)
    torch.testing.assert_close(softmax_only.weight_penalty(model), 1e-3 * w2 / n)


@pytest.mark.parametrize("spec", ["softmax=1,triplet=1", "lifted", "hdml-triplet", "verification,lsoftmax"])
def test_short_training_run_separates_classes(spec):
    """A linear embedding of 4 overlapping Gaussian clusters, trained for 40 steps: nearest-neighbour
    accuracy (Recall@1) on held-out points must rise well above the untrained model's (0.54)."""
    torch.manual_seed(0)
    centers = torch.randn(4, 16) * 0.7
    def data(n):
        y = torch.arange(4).repeat_interleave(n)
        return centers[y] + torch.randn(4 * n, 16), y

    train_x, train_y = data(16)
    test_x, test_y = data(25)
    model = torch.nn.Linear(16, 8)
    head = torch.nn.Linear(8, 4)
    task = build_task_loss(spec, 8, 4)
    def recall_at_1():
        with torch.no_grad():
            e = F.normalize(model(test_x), dim=1)
            d = torch.cdist(e, e).fill_diagonal_(float("inf"))
            return (test_y[d.argmin(1)] == test_y).float().mean().item()

    before = recall_at_1()
    opt = torch.optim.Adam([*model.parameters(), *head.parameters(), *task.parameters()], lr=0.01)
    for _ in range(40):
        z = model(train_x)
        total, _ = task(F.normalize(z, dim=1), head(z), train_y)
        opt.zero_grad()
        total.backward()
        opt.step()
    after = recall_at_1()
    assert after >= before + 0.15
