"""Acquire the run's teacher: use it as given, reuse the one trained earlier, or train it here;
then choose the layer its embedding comes from and say whether its logits fit the task.

A frozen teacher's logits are used only when its classes are the task's (:func:`task_logits`).
``onnx:``, a distill model file and (without ``teacher_finetune``) a plain state dict are used as
they are; otherwise the teacher is trained here once (from scratch, or fine-tuned from the given
backbone weights) and cached as ``<out>/teacher.pt``, reused only when every field in
``TEACHER_FIELDS`` and the training data match.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from rich.markup import escape

from distill import engine
from distill.config import Config, teacher_fields
from distill.config_load import distill_terms
from distill.console import make_console
from distill.data import data_fingerprint
from distill.data.prepare import Prepared
from distill.engine import barrier, is_main_process
from distill.errors import DistillError
from distill.models import NotAModelFile, build_model, parse_spec, read_model_file, save_model
from distill.models.file import load_backbone_weights
from distill.objective import build_objective, unusable_logits
from distill.teachers import Teacher, file_fingerprint, load_teacher
from distill.teachers.layers import EMBEDDING, PooledLayers, choose_layer, feature_layers
from distill.training import batch_sampler, chance_check, default_epochs, finished_checkpoint, train_settings, weight_penalty

console = make_console(stderr=True)

# Every Config field that shapes a teacher trained here (``shapes_teacher`` in its metadata): a cached
# <out>/teacher.pt is reused only when all of them (and the training data) match.
TEACHER_FIELDS = teacher_fields()


@dataclass
class AcquiredTeacher:
    """The frozen teacher of a run, what ``--teacher-layer auto`` measured (``layer_choice``: the
    chosen layer, the metric and every layer's score; None when nothing was chosen) and the seconds
    of its stages (``teacher``: training it or reading its weights; ``teacher layer choice``), and the
    training summary of a teacher trained here (``fit``; None for one used as given)."""

    teacher: Teacher
    layer_choice: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    fit: dict | None = None


def acquire_teacher(cfg: Config, data: Prepared, device: torch.device) -> AcquiredTeacher:
    """The teacher of ``cfg`` (see the module docstring). With ``--teacher-layer auto`` its embedding
    comes from the layer that scores best on validation (``teachers.layers``); the compat loss needs
    the teacher's own embedding space, so with it no layer is searched."""
    started = time.perf_counter()
    weights, fit = teacher_weights(cfg, data, device)

    def load(layer: str) -> Teacher:
        return load_teacher(cfg.teacher, weights=weights, device=str(device), layer=None if layer == EMBEDDING else layer)

    layer = EMBEDDING if cfg.teacher_layer == "auto" and "compat" in distill_terms(cfg) else cfg.teacher_layer
    if layer != "auto":
        teacher = check_compat(cfg, task_logits(load(layer), data.num_classes), layer)
        return AcquiredTeacher(teacher, timings={"teacher": time.perf_counter() - started}, fit=fit)
    teacher = load(EMBEDDING)
    timings = {"teacher": time.perf_counter() - started}
    layers = feature_layers(cfg.teacher, teacher.module)
    if not layers or not data.val:
        return AcquiredTeacher(task_logits(teacher, data.num_classes), timings=timings, fit=fit)
    started = time.perf_counter()
    scores = layer_scores(teacher, layers, data, device)
    chosen = choose_layer(scores)
    teacher = teacher if chosen == EMBEDDING else load(chosen)
    metric = data.protocol.validation_metric
    console.print(
        f"teacher embedding: [bold]{escape(chosen)}[/] (validation {metric} {scores[chosen]:.3f}; its own "
        f"embedding {scores[EMBEDDING]:.3f}; {len(scores)} layers tried, set one with --teacher-layer)"
    )
    timings["teacher layer choice"] = time.perf_counter() - started
    choice = {"chosen": chosen, "metric": metric, "scores": scores}
    return AcquiredTeacher(task_logits(teacher, data.num_classes), choice, timings, fit)


def layer_scores(teacher: Teacher, layers: list[str], data: Prepared, device: torch.device) -> dict[str, float]:
    """The validation score (``Protocol.distractor_map``) of the teacher's embedding and of each layer
    (one forward pass), listed embedding first, then from the deepest layer to the shallowest (the
    order ties are broken in)."""
    probe = PooledLayers(teacher.module, layers)
    try:
        scores = dict(zip([EMBEDDING, *layers], data.protocol.distractor_maps(probe, data, device)))
    finally:
        probe.close()
    return {name: scores[name] for name in [EMBEDDING, *reversed(layers)]}


def check_compat(cfg: Config, teacher: Teacher, layer: str) -> Teacher:
    """Fail before any student trains when ``--distill compat`` cannot work: the student's embedding
    must live in the teacher's space, so the sizes must match."""
    if "compat" in distill_terms(cfg) and teacher.embed_dim != cfg.embed_dim:
        raise DistillError(
            f"--distill compat puts the student in the teacher's embedding space, so --embed-dim must be its size: "
            f"got --embed-dim {cfg.embed_dim}, the teacher's {layer} layer gives {teacher.embed_dim} "
            f"(set --embed-dim {teacher.embed_dim}, or leave compat out of --distill)"
        )
    return teacher


def task_logits(teacher: Teacher, num_classes: int) -> Teacher:
    """Turn off the teacher's logits when they cannot teach the task (``unusable_logits``: its classes are
    not the task's), so they are neither computed nor cached; ``build_objective`` says what that turns off.
    ``num_classes`` 0 (no labeled data): the student takes the teacher's classes, its logits stay on."""
    if teacher.has_logits and unusable_logits(teacher, num_classes):
        teacher.has_logits = False
    return teacher


def teacher_weights(cfg: Config, data: Prepared, device: torch.device) -> tuple[str | None, dict | None]:
    """Where the teacher's weights are: None for ``onnx:``, the given file when it is used as it is,
    else ``<out>/teacher.pt``, trained here first unless the cached one matches the recipe; and the
    training summary of a teacher trained here (this time or the cached one's; None otherwise)."""
    if parse_spec(cfg.teacher).kind == "onnx":
        return None, None
    if cfg.teacher_weights and is_distill_model_file(cfg.teacher_weights):
        if cfg.teacher_finetune:
            raise DistillError(
                f"{cfg.teacher_weights} is a distill model file, used as it is: --teacher-finetune fine-tunes a plain "
                "state dict; drop it"
            )
        return cfg.teacher_weights, None
    if cfg.teacher_weights and not cfg.teacher_finetune:
        return cfg.teacher_weights, None
    torch.manual_seed(cfg.seed)  # the same --seed gives the same teacher
    model = build_model(cfg.teacher, cfg.embed_dim, data.num_classes)
    if cfg.teacher_weights:  # given weights are read and checked first, even when the cached teacher is reused
        load_backbone_weights(model, cfg.teacher_weights)
    path = cfg.out_dir / "teacher.pt"
    fingerprint = data_fingerprint(data.train.samples)
    recipe = teacher_recipe(cfg)
    diffs, cached = cached_teacher_differences(path, recipe, fingerprint)
    if diffs == []:
        console.print(f"[green]reusing the teacher trained earlier:[/] {escape(str(path))}")
        fit = cached.get("fit")
        if (note := (fit or {}).get("chance_note")) and is_main_process():
            console.print(f"[yellow]warning:[/] {note}")
        return str(path), fit
    if diffs:
        console.print(f"[yellow]{escape(str(path))} was trained with other settings ({escape('; '.join(diffs))}): training a new one")
    return str(path), train_teacher(cfg, model, data, device, path, recipe, fingerprint)


def train_teacher(cfg: Config, model: nn.Module, data: Prepared, device: torch.device, path: Path,
                  recipe: dict[str, Any], fingerprint: str) -> dict:
    """Train the teacher ``model`` (built from scratch, or from ``teacher_weights`` to fine-tune) and
    save it at ``path`` with its ``recipe``, the training data's ``fingerprint`` and its training
    summary, which it returns."""
    objective = build_objective(cfg, data.num_classes)
    checkpoint = cfg.out_dir / "teacher.ckpt"
    model, summary = engine.fit(
        model, objective, data.train, batch_sampler(cfg, data.train.labels), train_settings(cfg, device, teacher=True),
        checkpoint, penalty=weight_penalty(objective), desc="teacher", validate=data.protocol.validator(data, device),
        recipe=recipe | {"data_fingerprint": fingerprint},
    )
    summary |= chance_check("the teacher", summary, data)
    if is_main_process():
        save_model(path, model, arch=cfg.teacher, data=fingerprint, image_size=list(cfg.image_size), recipe=recipe, fit=summary)
        finished_checkpoint(checkpoint, cfg)
    barrier()
    return summary


def teacher_recipe(cfg: Config) -> dict[str, Any]:
    """The ``TEACHER_FIELDS`` of ``cfg`` as JSON values; given weights by their content hash, not their path."""
    recipe = {name: getattr(cfg, name) for name in TEACHER_FIELDS}
    if cfg.teacher_epochs is None and cfg.teacher_steps is None:  # the default length, which follows the data
        recipe["teacher_default_epochs"] = default_epochs(cfg, teacher=True)
    if cfg.teacher_weights:
        recipe["teacher_weights"] = file_fingerprint(cfg.teacher_weights)
    return json.loads(json.dumps(recipe))


def cached_teacher_differences(path: Path, recipe: dict[str, Any], fingerprint: str) -> tuple[list[str] | None, dict]:
    """What differs between the teacher cached at ``path`` and the one asked for ([] when it can be
    reused; None when there is no usable cache: missing or unreadable, it is then trained anew), and
    the cached file's ``meta`` (its recipe, data fingerprint and training summary; {} without one)."""
    if not path.exists():
        return None, {}
    try:
        info, _ = read_model_file(path)
    except DistillError as err:
        console.print(f"[yellow]the cached teacher is unusable ({escape(str(err))}): training a new one")
        return None, {}
    meta = info.get("meta", {})
    cached = meta.get("recipe", {})
    diffs = [f"{k}={cached.get(k)!r} (now {v!r})" for k, v in recipe.items() if cached.get(k) != v]
    if meta.get("data") != fingerprint:
        diffs.append("the training data")
    return diffs, meta


def is_distill_model_file(path: str) -> bool:
    """True when ``path`` is one of our model files (else it is a plain state dict)."""
    try:
        read_model_file(path)
    except NotAModelFile:
        return False
    return True
