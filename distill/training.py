"""What the teacher's and the students' trainings share: their settings, their batches, the task
loss's weight penalty, the chance check of the epoch kept and the clean-up of a finished
training's checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from distill.arithmetic import default_amp, default_channels_last
from distill.config import AUGMENTED_EPOCHS, AUGMENTED_TEACHER_EPOCHS, DEFAULT_EPOCHS, DEFAULT_TEACHER_EPOCHS, Config
from distill.console import make_console
from distill.data.importance import ImportanceBatchSampler
from distill.data.samplers import PKSampler
from distill.data.unlabeled import UnlabeledBatchSampler
from distill.engine import BatchSampler, TrainSettings, distributed, is_main_process
from distill.errors import DistillError
from distill.losses.task import HPARAMS
from distill.objective import StudentObjective
from distill.selection import chance_note, near_chance

console = make_console(stderr=True)


def train_settings(
    cfg: Config, device: torch.device, teacher: bool = False, unlabeled: UnlabeledBatchSampler | None = None
) -> TrainSettings:
    """The teacher's or the students' training settings. A length the user gave (epochs or steps)
    runs as given; only the default length is raised to the minimum number of steps, and, when the
    student also learns from ``unlabeled`` images, to as many passes over them as the default epochs
    make over the labeled ones (an epoch counts the labeled batches, each of which carries a share
    of the unlabeled images: 6,000 unlabeled images beside 600 labeled ones would otherwise be seen
    about once)."""
    epochs, steps, minimum = (
        (cfg.teacher_epochs, cfg.teacher_steps, cfg.teacher_min_steps) if teacher else (cfg.epochs, cfg.steps, cfg.min_steps)
    )
    default = default_epochs(cfg, teacher)
    plain = DEFAULT_TEACHER_EPOCHS if teacher else DEFAULT_EPOCHS  # the default without augmentation
    given = epochs is not None or steps is not None
    why = ""
    if unlabeled is not None and default * unlabeled.steps_per_pass > minimum:
        minimum = default * unlabeled.steps_per_pass
        why = f"{minimum} steps, {default} passes over the {unlabeled.count} unlabeled images"
    return TrainSettings(
        epochs=epochs if epochs is not None else default,
        steps=steps,
        min_steps=0 if given else minimum,
        min_steps_why="" if given else why,
        default_note="" if given or default == plain else
        f"the default for the '{cfg.augment}' augmentation ({plain} epochs without it): every pass "
        "shows other crops, flips and erasures (a length you set runs as given)",
        lr=cfg.teacher_lr if teacher else cfg.lr,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        device=str(device),
        amp=cfg.amp if cfg.amp is not None else default_amp(device.type == "cuda", cfg.image_size),
        channels_last=cfg.channels_last if cfg.channels_last is not None else default_channels_last(device.type == "cuda", cfg.image_size),
        compile=cfg.compile,
        workers=cfg.workers,
        resume=cfg.resume,
        fresh=cfg.fresh,
        gather_embeddings=cfg.gather_embeddings,
        mix_rows=0 if teacher else mix_rows(cfg),
    )


def mix_rows(cfg: Config) -> int:
    """The mixed images of each distilled batch (``distill.data.mixing``): ``--mix-rows``, or as many as
    the batch has images when it is left unset (0 turns mixing off)."""
    return cfg.mix_rows if cfg.mix_rows is not None else cfg.batch_size


def default_epochs(cfg: Config, teacher: bool) -> int:
    """The length left unset runs for: ``DEFAULT_EPOCHS`` for a student, ``DEFAULT_TEACHER_EPOCHS`` for
    the teacher, or ``AUGMENTED_EPOCHS`` / ``AUGMENTED_TEACHER_EPOCHS`` with the 'standard' augmentation
    (every pass shows other views, so they need more passes)."""
    if cfg.augment == "standard":
        return AUGMENTED_TEACHER_EPOCHS if teacher else AUGMENTED_EPOCHS
    return DEFAULT_TEACHER_EPOCHS if teacher else DEFAULT_EPOCHS


def batch_sampler(cfg: Config, labels: Sequence[int]) -> BatchSampler:
    """This process's training batches: ``cfg.sampler`` (P x K or importance sampling) over ``labels``,
    seeded by ``cfg.seed``, its share of them under torchrun."""
    rank, world = distributed()
    if cfg.sampler == "importance":
        margin = float(cfg.loss_options.get("triplet_margin", HPARAMS["triplet_margin"]))
        return ImportanceBatchSampler(labels, cfg.batch_size, margin=margin, seed=cfg.seed, rank=rank, world_size=world)
    p, k = cfg.batch_size // cfg.images_per_id, cfg.images_per_id
    sampler = PKSampler(labels, p=p, k=k, seed=cfg.seed, rank=rank, world_size=world)
    if len(sampler) == 0:
        raise DistillError(
            f"the training set is too small for batches of {p} identities x {k} images "
            f"({len(set(labels))} identities): lower --batch-size"
        )
    return sampler


def weight_penalty(objective: StudentObjective) -> Callable[[nn.Module], Tensor] | None:
    """The task loss's L2 weight penalty (``--loss-opt weight_l2=0.001``), or None when it is off."""
    return objective.task.weight_penalty if objective.task.hparams["weight_l2"] > 0 else None


def finished_checkpoint(checkpoint: Path, cfg: Config) -> None:
    """Delete a training's checkpoint once its model file is written (unless ``keep_checkpoints``):
    it is only needed to resume, and holds the optimiser's state too (a few times the model's size)."""
    if not cfg.keep_checkpoints:
        checkpoint.unlink(missing_ok=True)


def chance_check(name: str, fit_summary: dict, data: Any) -> dict:
    """The chance level of the validation score (``Protocol.distractor_chance`` of the prepared
    ``data``) and, when ``name``'s kept model is near it, a warning on the console and in the
    returned ``chance_note`` (empty dict without validation)."""
    if "best_score" not in fit_summary:
        return {}
    chance = data.protocol.distractor_chance(data)
    note = chance_note(name, fit_summary, chance)
    if note and is_main_process():
        console.print(f"[yellow]warning:[/] {note}")
    near = near_chance(fit_summary["best_score"], fit_summary.get("best_score_se", 0.0), chance)
    return {"metric": data.protocol.validation_metric, "chance": chance, "near_chance": near} | (
        {"chance_note": note} if note else {})
