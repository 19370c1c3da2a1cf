"""Train the students of a run: each one alone (the baseline) and distilled from the teacher.

A student starts from ``--student-weights`` when given; with a teacher, the objective adds the
distillation terms to the task losses and the unlabeled images (``--unlabeled``) join every batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from rich.markup import escape
from torch import Tensor, nn
from torch.utils.data import Dataset

from distill import engine
from distill.balance import BATCHES, balance_weights
from distill.config import Config, fields_where
from distill.config_load import student_specs
from distill.console import make_console
from distill.data import Sample, data_fingerprint
from distill.data.mixing import MIXED
from distill.data.prepare import Prepared, unlabeled_images
from distill.data.unlabeled import JointDataset, UnlabeledBatchSampler, unlabeled_fingerprint
from distill.engine import BatchSampler, distributed, extract, is_main_process
from distill.models import save_model
from distill.objective import build_objective, distillation_fields
from distill.selection import has_not_learnt
from distill.students import create_student
from distill.students.weights import load_student_weights, student_weights_file
from distill.teachers import Teacher, file_fingerprint
from distill.teachers.cache import cache_key, cached_outputs
from distill.teachers.gate import teacher_gate
from distill.timing import StageClock
from distill.training import batch_sampler, chance_check, finished_checkpoint, train_settings, weight_penalty

console = make_console(stderr=True)

# Config fields that change no trained weight, left out of a student checkpoint's recipe; the
# teacher's own fields are left out too (its fingerprint stands for them), and for a baseline, which
# has no teacher, the distillation terms' (distillation_fields).
NOT_TRAINING_FIELDS = fields_where("trains", False)


@dataclass
class TrainedStudent:
    """One student of a run: its ``spec`` (``NAME@WIDTH``), the ``suffix`` of its files, the distilled
    model and its training summary, and the baseline (trained alone; None without one) and its summary."""

    spec: str
    suffix: str
    student: nn.Module
    fit: dict
    baseline: nn.Module | None = None
    baseline_fit: dict | None = None


def train_students(
    cfg: Config, data: Prepared, device: torch.device, teacher: Teacher, clock: StageClock
) -> tuple[list[TrainedStudent], dict | None]:
    """Every student of ``cfg``: the baseline first (unless ``--no-baseline`` or no labeled data), then
    the distilled one; and the teacher gate (``teachers.gate``), which compares the teacher with the
    first student alone (main process only; None elsewhere). Each training is a stage of ``clock``."""
    trained, gate = [], None
    with_baseline = cfg.baseline and data.num_classes > 0
    if cfg.baseline and not with_baseline:
        console.print("no labeled training images: no baseline student (it would learn from nothing)")
    for spec, suffix, student_cfg in student_runs(cfg):
        baseline, baseline_fit = None, None
        if with_baseline:
            with clock.stage(f"student_baseline{suffix}"):
                baseline, baseline_fit = train_student(student_cfg, data, device, name=f"student_baseline{suffix}")
        if not trained and is_main_process():
            with clock.stage("teacher gate"):
                gate = teacher_gate(cfg, teacher, baseline, data, device)
        with clock.stage(f"student{suffix}"):
            student, fit = train_student(student_cfg, data, device, teacher=teacher, name=f"student{suffix}")
        trained.append(TrainedStudent(spec, suffix, student, fit, baseline, baseline_fit))
    return trained, gate


def student_runs(cfg: Config) -> list[tuple[str, str, Config]]:
    """``(spec, file suffix, config)`` per student: the config has that student's name and width; the
    suffix names its files (``student-nin_bn@0.5.pt``), empty with one student (``student.pt``)."""
    specs = student_specs(cfg)
    runs = []
    for name, width in specs:
        spec = f"{name}@{width:g}"
        suffix = "" if len(specs) == 1 else "-" + re.sub(r"[^\w.@-]", "_", spec)
        runs.append((spec, suffix, replace(cfg, student=name, student_width=width, students=None)))
    return runs


# --retry-lr: a student that has not learnt is trained again from the start at lr / RETRY_LR_DIVISOR
# (CUHK03: at 3e-3 the student alone collapsed on 3 of 5 seeds in the warm-up's peak; at 1e-3 on none)
RETRY_LR_DIVISOR = 3


def train_student(
    cfg: Config, data: Prepared, device: torch.device, teacher: Teacher | None = None, name: str = "student"
) -> tuple[nn.Module, dict]:
    """Train one student and save it as ``<out>/<name>.pt``; returns it and its training summary
    (``engine.fit``'s, with the chance check). Without labeled data the student takes the teacher's
    classes (for KD). When the kept model has not learnt (``selection.has_not_learnt``) and
    ``cfg.retry_lr``, the student is trained once more from the same seed at ``lr / RETRY_LR_DIVISOR``
    (its checkpoint ``<name>.retry.ckpt``) and that model is kept; the summary's ``retry`` says so
    and holds the first training's summary."""
    checkpoints = [cfg.out_dir / f"{name}.ckpt"]
    model, summary, origin = _fit_student(cfg, data, device, teacher, name, checkpoints[0])
    if has_not_learnt(summary) and cfg.retry_lr:
        lr = cfg.lr / RETRY_LR_DIVISOR
        if is_main_process():
            console.print(f"[yellow]{escape(name)} has not learnt at lr {cfg.lr:g}:[/] training it again from the start at lr {lr:g}")
        checkpoints.append(cfg.out_dir / f"{name}.retry.ckpt")
        first = summary
        model, summary, origin = _fit_student(replace(cfg, lr=lr), data, device, teacher, name, checkpoints[1])
        summary["retry"] = {"lr": lr, "first_lr": cfg.lr, "first": first}
    if is_main_process():
        save_model(
            cfg.out_dir / f"{name}.pt", model, arch=cfg.student, width=cfg.student_width,
            multiscale=cfg.multiscale, image_size=list(cfg.image_size), fit=summary, **origin,
        )
        for checkpoint in checkpoints:
            finished_checkpoint(checkpoint, cfg)
    return model, summary


def _fit_student(
    cfg: Config, data: Prepared, device: torch.device, teacher: Teacher | None, name: str, checkpoint: Path
) -> tuple[nn.Module, dict, dict]:
    """One training of the student from ``cfg.seed`` (a fresh model, objective and batches): the
    model, its summary and its origin (the fingerprints of its start weights and unlabeled images)."""
    torch.manual_seed(cfg.seed)
    num_classes = data.num_classes or (teacher.num_classes if teacher is not None and teacher.has_logits else 1)
    model = create_student(cfg.student, cfg.embed_dim, num_classes, width=cfg.student_width, multiscale=cfg.multiscale)
    weights = student_weights_file(cfg.student_weights, cfg.student_pretrained, cfg.student)
    if weights:
        load_student_weights(model, weights, cfg.student, cfg.student_width)
    objective = build_objective(cfg, num_classes, teacher)
    unlabeled = unlabeled_images(cfg, data) if teacher is not None else []
    dataset, plain, sampler = training_set(cfg, data, unlabeled)
    teacher_fn = teacher_outputs(cfg, teacher, dataset, plain, data.eval_transform, device) if teacher is not None else None
    origin = {"student_weights": file_fingerprint(weights)} if weights else {}
    origin |= {"unlabeled": unlabeled_fingerprint(unlabeled, sampler.batch)} if unlabeled else {}
    settings = train_settings(cfg, device, unlabeled=sampler if unlabeled else None)
    balanced = {}
    if objective.distill.scales is not None and teacher_fn is not None:
        balanced = {"distill_weights": balance_weights(model, objective, dataset, sampler, teacher_fn, device,
                                                       settings.memory_format, settings.mix_rows)}
        if is_main_process():
            console.print(f"{escape(name)}: distillation weights from the gradients of the first {BATCHES} batches: " + ", ".join(
                f"{term} {ratio:g}x the task's -> {balanced['distill_weights'][term]:.4g}" for term, ratio in objective.distill.terms))
    model, summary = engine.fit(
        model, objective, dataset, sampler, settings, checkpoint,
        teacher_fn=teacher_fn, penalty=weight_penalty(objective), desc=name, validate=data.protocol.validator(data, device),
        recipe=student_recipe(cfg, data, teacher) | origin,
    )
    return model, summary | balanced | chance_check(name, summary, data), origin


def student_recipe(cfg: Config, data: Prepared, teacher: Teacher | None) -> dict[str, Any]:
    """Everything that shapes a student's training (recorded in its checkpoint; ``--resume`` refuses a
    checkpoint whose record differs): its options, the teacher's fingerprint, the training data's."""
    skip = NOT_TRAINING_FIELDS + (distillation_fields() if teacher is None else ())
    options = {k: v for k, v in cfg.to_dict().items() if k not in skip and not k.startswith("teacher")}
    return options | {"teacher_fingerprint": teacher.fingerprint if teacher else None,
                      "data_fingerprint": data_fingerprint(data.train.samples)}


def training_set(cfg: Config, data: Prepared, unlabeled: list[Sample]) -> tuple[Dataset, Dataset, BatchSampler]:
    """``(training set, its un-augmented twin, batch sampler)``: the labeled images in P x K (or
    importance-sampled) batches, plus ``unlabeled_batch`` unlabeled images in each when there are any."""
    labeled = batch_sampler(cfg, data.train.labels) if len(data.train) else None
    if not unlabeled:
        return data.train, data.train_plain, labeled
    rank, world = distributed()
    batch = cfg.unlabeled_batch or cfg.batch_size
    joint = JointDataset(data.train, unlabeled, data.train.transform)
    plain = joint if data.train is data.train_plain else JointDataset(data.train_plain, unlabeled, data.eval_transform)
    sampler = UnlabeledBatchSampler(
        labeled, len(data.train), len(unlabeled), batch, seed=cfg.seed, rank=rank, world_size=world,
        fingerprint=unlabeled_fingerprint(unlabeled, batch),
    )
    return joint, plain, sampler


def teacher_outputs(
    cfg: Config, teacher: Teacher, train: Dataset, plain: Dataset, eval_transform: Callable, device: torch.device
) -> Callable[[Tensor, Tensor], Any]:
    """Per-batch teacher outputs: looked up in the on-disk cache when training is un-augmented
    (``train is plain``; keyed by the teacher and every image, unlabeled ones included; mixed rows,
    index ``MIXED``, are in no dataset and scored live), computed on the fly (no grad) on the
    augmented batch otherwise."""
    if train is plain:
        key = cache_key(teacher.fingerprint, data_fingerprint(plain.samples), eval_transform)
        (emb, logits), hit = cached_outputs(key, cfg.out_dir / "cache", lambda: tuple(extract(teacher, plain, device)))
        if hit:
            console.print("[green]teacher outputs read from the cache")
        emb, logits = emb.to(device), (logits.to(device) if logits is not None else None)

        @torch.no_grad()
        def looked_up(images: Tensor, indices: Tensor):
            mixed = int((indices == MIXED).sum())  # appended after the dataset's rows (distill.data.mixing)
            rows = indices[: len(indices) - mixed]
            stored = emb[rows], logits[rows] if logits is not None else None
            if not mixed:
                return stored
            live = teacher(images[len(rows):])
            return tuple(None if s is None else torch.cat([s, l.to(s.dtype)]) for s, l in zip(stored, live))

        return looked_up

    @torch.no_grad()
    def online(images: Tensor, indices: Tensor):
        return teacher(images)

    return online
