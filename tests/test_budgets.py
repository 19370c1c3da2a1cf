"""Training budgets: a length the user sets (epochs or steps) runs as given; only the default
length is raised to the minimum number of steps, and then one line says so."""

from __future__ import annotations

import pytest
import torch

from distill.config import AUGMENTED_EPOCHS, AUGMENTED_TEACHER_EPOCHS, DEFAULT_EPOCHS, DEFAULT_TEACHER_EPOCHS
from distill.config_load import load_config
from distill.data.samplers import PKSampler
from distill.data.unlabeled import UnlabeledBatchSampler
from distill.engine import TrainSettings, fit
from distill.training import train_settings
from tests.test_engine import CrossEntropy, batches, dataset, steps_per_epoch, tiny_model  # noqa: F401 (fixture)

CPU = torch.device("cpu")
PER_EPOCH = 3  # steps per epoch in these checks


def epochs_run(teacher: bool, **options) -> int:
    return train_settings(load_config(**options), CPU, teacher=teacher).num_epochs(PER_EPOCH)


@pytest.mark.parametrize("teacher", [False, True])
def test_a_given_length_runs_as_given_even_below_the_minimum(teacher):
    prefix = "teacher_" if teacher else ""
    minimum = {f"{prefix}min_steps": 300}
    # --teacher-steps 60 ran 300 steps when the minimum won silently; now it runs 60 (20 epochs of 3)
    assert epochs_run(teacher, **{f"{prefix}steps": 60}, **minimum) == 20
    assert epochs_run(teacher, **{f"{prefix}steps": 61}, **minimum) == 21  # rounded up to whole epochs
    assert epochs_run(teacher, **{f"{prefix}epochs": 2}, **minimum) == 2
    assert epochs_run(teacher, **{f"{prefix}epochs": 2, f"{prefix}steps": 9}, **minimum) == 3  # steps override epochs


@pytest.mark.parametrize("teacher", [False, True])
def test_the_default_length_is_raised_to_the_minimum(teacher):
    prefix = "teacher_" if teacher else ""
    default = DEFAULT_TEACHER_EPOCHS if teacher else DEFAULT_EPOCHS
    assert epochs_run(teacher, **{f"{prefix}min_steps": 0}) == default
    assert epochs_run(teacher, **{f"{prefix}min_steps": 3 * default * PER_EPOCH + 1}) == 3 * default + 1
    # the other model's settings do not leak in
    other = "" if teacher else "teacher_"
    assert epochs_run(teacher, **{f"{prefix}min_steps": 0, f"{other}steps": 999, f"{other}min_steps": 999}) == default


def unlabeled_sampler(count: int, per_batch: int, world: int = 1) -> UnlabeledBatchSampler:
    labeled = PKSampler([i // 4 for i in range(24)], p=2, k=4, seed=0)  # 3 labeled batches, like PER_EPOCH
    return UnlabeledBatchSampler(labeled, 24, count, per_batch, world_size=world)


def test_the_default_student_length_passes_over_the_unlabeled_images_as_often_as_over_the_labeled():
    unlabeled = unlabeled_sampler(count=100, per_batch=4)  # 25 steps per pass over them, 3 labeled steps per epoch
    assert unlabeled.steps_per_pass == 25 and len(unlabeled) == PER_EPOCH
    assert unlabeled_sampler(count=100, per_batch=4, world=2).steps_per_pass == 12  # each rank's share of a pass
    cfg = load_config(min_steps=0)
    settings = train_settings(cfg, CPU, unlabeled=unlabeled)
    assert settings.min_steps == DEFAULT_EPOCHS * 25
    assert settings.num_epochs(PER_EPOCH) == -(-DEFAULT_EPOCHS * 25 // PER_EPOCH)  # 100 epochs of 3 labeled batches
    assert settings.budget_note(PER_EPOCH) == (
        f"the default {DEFAULT_EPOCHS} epochs ({DEFAULT_EPOCHS * PER_EPOCH} steps) raised to 100 to reach "
        f"{DEFAULT_EPOCHS * 25} steps, {DEFAULT_EPOCHS} passes over the 100 unlabeled images (a length you set runs as given)"
    )
    # a larger --min-steps still wins, and a length the user gave runs as given
    assert train_settings(load_config(min_steps=999), CPU, unlabeled=unlabeled).min_steps == 999
    assert train_settings(load_config(epochs=2), CPU, unlabeled=unlabeled).num_epochs(PER_EPOCH) == 2
    assert train_settings(load_config(steps=30), CPU, unlabeled=unlabeled).min_steps_why == ""
    # few unlabeled images change nothing
    assert train_settings(cfg, CPU, unlabeled=unlabeled_sampler(count=8, per_batch=4)).num_epochs(PER_EPOCH) == DEFAULT_EPOCHS


def test_the_budget_note_says_when_and_why_the_length_changed():
    raised = TrainSettings(epochs=4, lr=1.0, min_steps=30)
    assert raised.budget_note(3) == (
        "the default 4 epochs (12 steps) raised to 10 to reach the minimum of 30 steps (a length you set runs as given)"
    )
    assert TrainSettings(epochs=4, lr=1.0, min_steps=12).budget_note(3) is None
    assert TrainSettings(epochs=4, lr=1.0, steps=30).budget_note(3) is None


def test_fit_prints_one_line_when_the_minimum_raised_the_length(dataset, tmp_path, capsys):  # noqa: F811
    per_epoch = steps_per_epoch(dataset)
    settings = TrainSettings(epochs=1, lr=1e-2, min_steps=2 * per_epoch, workers=0, amp=False)
    _, summary = fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), settings, tmp_path / "a.ckpt", desc="teacher")
    assert summary["steps"] == 2 * per_epoch
    err = capsys.readouterr().err
    assert f"teacher: 2 epochs x {per_epoch} steps; the default 1 epochs ({per_epoch} steps) raised to 2" in err
    fit(tiny_model(6), CrossEntropy(), dataset, batches(dataset), TrainSettings(epochs=1, lr=1e-2, workers=0, amp=False),
        tmp_path / "b.ckpt", desc="student")
    err = capsys.readouterr().err
    assert f"student: 1 epochs x {per_epoch} steps" in err and "raised" not in err


@pytest.mark.parametrize("augment, teacher_epochs, epochs", [("standard", AUGMENTED_TEACHER_EPOCHS, AUGMENTED_EPOCHS),
                                                             ("light", DEFAULT_TEACHER_EPOCHS, DEFAULT_EPOCHS),
                                                             ("none", DEFAULT_TEACHER_EPOCHS, DEFAULT_EPOCHS)])
def test_the_default_lengths_follow_the_augmentation(augment, teacher_epochs, epochs):
    assert AUGMENTED_TEACHER_EPOCHS > DEFAULT_TEACHER_EPOCHS and AUGMENTED_EPOCHS > DEFAULT_EPOCHS
    assert epochs_run(True, augment=augment, teacher_min_steps=0) == teacher_epochs
    assert epochs_run(False, augment=augment, min_steps=0) == epochs
    assert epochs_run(True, augment=augment, teacher_epochs=5) == 5  # a given length runs as given
    assert epochs_run(False, augment=augment, epochs=5) == 5
    for teacher, plain in ((True, DEFAULT_TEACHER_EPOCHS), (False, DEFAULT_EPOCHS)):
        note = train_settings(load_config(augment=augment, teacher_min_steps=0, min_steps=0), CPU, teacher=teacher).budget_note(PER_EPOCH)
        if augment == "standard":
            assert note == (f"the default for the 'standard' augmentation ({plain} epochs without it): "
                            "every pass shows other crops, flips and erasures (a length you set runs as given)")
        else:
            assert note is None
    assert train_settings(load_config(augment=augment, teacher_steps=30), CPU, teacher=True).budget_note(PER_EPOCH) is None
    assert train_settings(load_config(augment=augment, steps=30), CPU).budget_note(PER_EPOCH) is None


def test_a_cached_teacher_of_another_default_length_is_not_reused():
    from distill.teachers.acquire import teacher_recipe

    standard, light = teacher_recipe(load_config(augment="standard")), teacher_recipe(load_config(augment="light"))
    assert standard["teacher_default_epochs"] == AUGMENTED_TEACHER_EPOCHS
    assert light["teacher_default_epochs"] == DEFAULT_TEACHER_EPOCHS
    assert "teacher_default_epochs" not in teacher_recipe(load_config(augment="standard", teacher_epochs=60))
