"""``--distill-scale gradient`` (``distill.balance``): the measured factors against a slow reference
(one backward per term and batch, float64 norms), nothing of the training touched, the weights used
in the loss, and the errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill.balance import BATCHES, balance_weights
from distill.config_load import load_config
from distill.data.mixing import with_mixed_rows
from distill.errors import DistillError
from distill.losses.registry import LossInputs
from distill.embedding import EmbeddingNet
from distill.objective import build_objective

CLASSES, PER_BATCH = 4, 8


def tiny_student() -> nn.Module:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    return EmbeddingNet(backbone, 8, 16, CLASSES)


class Images(torch.utils.data.Dataset):
    """Random images whose reading draws from torch's random state, as an augmented set does."""

    def __init__(self, n: int) -> None:
        self.labels = [i % CLASSES for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.randn(3, 16, 8), self.labels[i], i


def setting(distill: str = "kd=1.5,darkrank=1.25", n: int = 48):
    torch.manual_seed(1)
    teacher_emb, teacher_logits = torch.randn(n, 16), torch.randn(n, CLASSES) * 3
    teacher = SimpleNamespace(embed_dim=16, num_classes=CLASSES, has_logits=True)
    cfg = load_config(None, distill=distill, distill_scale="gradient", embed_dim=16)
    objective = build_objective(cfg, CLASSES, teacher)
    sampler = [list(range(b * PER_BATCH, (b + 1) * PER_BATCH)) for b in range(n // PER_BATCH)]
    return objective, Images(n), sampler, lambda images, idx: (teacher_emb[idx], teacher_logits[idx])


def reference_norms(model, objective, dataset, sampler, teacher_fn, mix_rows=0):
    """Per batch (with ``mix_rows`` mixed rows), one backward per loss on a fresh copy of the model:
    (task norm, {term: norm}) summed."""
    import copy

    task_sum, term_sums = 0.0, {name: 0.0 for name, _ in objective.distill.terms}
    state = torch.random.get_rng_state()
    for indices in sampler[:BATCHES]:
        items = [dataset[i] for i in indices]
        images, labels = torch.stack([x[0] for x in items]), torch.tensor([x[1] for x in items])
        images, labels, rows = with_mixed_rows(images, labels, torch.tensor(indices), mix_rows)
        for which in ["task", *term_sums]:
            probe = copy.deepcopy(model).train()
            emb, logits = probe(images)
            t_emb, t_logits = teacher_fn(images, rows)
            if which == "task":
                loss, _ = objective.task_of_labeled(emb, logits, labels, t_emb)
            else:
                loss = objective.distill.losses[which](LossInputs(emb, logits, labels, t_emb, t_logits))
                loss = getattr(loss, "value", loss)
            loss.backward()
            norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in probe.parameters() if p.grad is not None))
            if which == "task":
                task_sum += norm
            else:
                term_sums[which] += norm
    torch.random.set_rng_state(state)
    return task_sum, term_sums


def test_the_factors_are_the_task_gradient_over_each_terms_as_a_slow_reference_measures_them():
    objective, dataset, sampler, teacher_fn = setting()
    model = tiny_student()
    torch.manual_seed(5)
    task, terms = reference_norms(model, objective, dataset, sampler, teacher_fn)
    torch.manual_seed(5)  # the same images for the measurement
    weights = balance_weights(model, objective, dataset, sampler, teacher_fn, torch.device("cpu"), torch.contiguous_format)
    assert objective.distill.scales.tolist() == pytest.approx([task / terms["kd"], task / terms["darkrank"]], rel=1e-5)
    assert weights == pytest.approx({"kd": 1.5 * task / terms["kd"], "darkrank": 1.25 * task / terms["darkrank"]}, rel=1e-5)


def test_with_mixed_rows_the_factors_are_measured_on_the_batches_training_sees():
    objective, dataset, sampler, _ = setting()
    torch.manual_seed(2)
    to_emb, to_logits = torch.randn(3, 16), torch.randn(3, CLASSES) * 3

    def live_teacher(images, indices):  # scores any image, mixed ones too
        return images.mean((2, 3)) @ to_emb, images.mean((2, 3)) @ to_logits

    model = tiny_student()
    torch.manual_seed(5)
    task, terms = reference_norms(model, objective, dataset, sampler, live_teacher, mix_rows=3)
    torch.manual_seed(5)
    balance_weights(model, objective, dataset, sampler, live_teacher, torch.device("cpu"), torch.contiguous_format, mix_rows=3)
    assert objective.distill.scales.tolist() == pytest.approx([task / terms["kd"], task / terms["darkrank"]], rel=1e-5)
    torch.manual_seed(5)
    unmixed, _ = reference_norms(model, objective, dataset, sampler, live_teacher)
    assert unmixed != pytest.approx(task, rel=1e-3)  # the mixed rows change what is measured


def test_the_measurement_leaves_the_model_and_the_random_state_as_they_were():
    objective, dataset, sampler, teacher_fn = setting()
    model = tiny_student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(9)
    state = torch.random.get_rng_state()
    balance_weights(model, objective, dataset, sampler, teacher_fn, torch.device("cpu"), torch.contiguous_format)
    assert torch.equal(torch.random.get_rng_state(), state)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm's running statistics too


def test_the_loss_uses_the_measured_weights():
    objective, dataset, sampler, teacher_fn = setting()
    weights = balance_weights(tiny_student(), objective, dataset, sampler, teacher_fn, torch.device("cpu"), torch.contiguous_format)
    torch.manual_seed(0)
    emb, logits, labels = torch.randn(8, 16), torch.randn(8, CLASSES), torch.arange(8) % CLASSES
    t_emb, t_logits = teacher_fn(None, torch.arange(8))
    total, parts = objective(emb, logits, labels, (t_emb, t_logits))
    task, _ = objective.task_of_labeled(emb, logits, labels, t_emb)
    expected = task + weights["kd"] * parts["kd"] + weights["darkrank"] * parts["darkrank"]
    assert float(total) == pytest.approx(float(expected), rel=1e-6)


def test_fixed_weights_add_no_state_and_measured_ones_start_unmeasured_and_are_checkpointed():
    teacher = SimpleNamespace(embed_dim=16, num_classes=CLASSES, has_logits=True)
    fixed = build_objective(load_config(None, embed_dim=16), CLASSES, teacher)
    assert fixed.distill.scales is None and "distill.scales" not in fixed.state_dict()
    scaled = build_objective(load_config(None, distill_scale="gradient", embed_dim=16), CLASSES, teacher)
    assert torch.isnan(scaled.distill.scales).all()  # NaN until measured: a loss of NaN, never a silent weight
    assert "distill.scales" in scaled.state_dict()  # checkpointed, so a resumed training keeps them


def test_without_a_task_loss_there_is_nothing_to_measure_against():
    objective, dataset, sampler, teacher_fn = setting()
    dataset.labels = [-1] * len(dataset.labels)  # unlabeled rows: no task loss
    with pytest.raises(DistillError, match="--distill-scale gradient measures each distillation term against the task loss, "
                                           "and this training has none"):
        balance_weights(tiny_student(), objective, dataset, sampler, teacher_fn, torch.device("cpu"), torch.contiguous_format)


def test_an_unknown_scale_is_one_clear_error():
    with pytest.raises(DistillError, match="--distill-scale must be one of fixed, gradient, got 'auto'"):
        load_config(None, distill_scale="auto")
