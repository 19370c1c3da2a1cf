"""Training loop: the batches of a given sampler (P x K or importance-sampled), AdamW + one-cycle schedule, AMP (bf16)
on GPU, channels_last (on GPU by default), optional torch.compile, DDP under torchrun, atomic checkpoints (at the
validation cadence) with every RNG state (so ``resume`` continues bit-for-bit on CPU), a JSONL metrics log and a rich
progress bar.

``fit`` knows nothing about distillation: it calls ``objective(emb, logits, labels, teacher_out)``
where ``teacher_out`` is whatever ``teacher_fn(images, indices)`` returns for the batch (or None).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from distill.atomic import atomic_write_text
from distill.data.dataset import ImageDataset
from distill.data.mixing import with_mixed_rows
from distill.data.samplers import loader_settings
from distill import selection
from distill.errors import DistillError
from distill.parallel import TrainStep, data_parallel, sum_over_ranks
from distill.resume import restore, save, training_recipe

TeacherFn = Callable[[Tensor, Tensor], Any]
BatchSampler = Sampler[list[int]]  # yields lists of dataset indices; has set_epoch(epoch)
Validator = Callable[[nn.Module], "float | Sequence[float] | Tensor"]  # per-query scores, or one
MAX_VALIDATIONS = 20  # validation rounds per training at most (small data sets run hundreds of epochs)


@dataclass
class TrainSettings:
    """``epochs`` is the length in passes over the data; ``steps``/``min_steps`` turn it into
    optimiser steps (rounded up to whole epochs), see :meth:`num_epochs`."""

    epochs: int
    lr: float
    steps: int | None = None  # exactly this many steps (rounded up to whole epochs) instead of epochs
    min_steps: int = 0  # at least this many steps
    min_steps_why: str = ""  # what the minimum is, for the budget note (default: "the minimum of N steps")
    default_note: str = ""  # why the default length is what it is, when that needs saying
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "cpu"
    amp: bool = False  # bf16 autocast of the model's (and a live teacher's) forward pass
    channels_last: bool = False  # the model and batches in channels_last memory format
    compile: bool = False
    workers: int | None = None
    resume: bool = False
    fresh: bool = False  # start over although an unfinished checkpoint exists; it is kept until this run passes it
    gather_embeddings: bool = False  # under torchrun: batch-level losses see the global batch
    mix_rows: int = 0  # with a teacher: mixed images added to each batch (distill.data.mixing)

    @property
    def memory_format(self) -> torch.memory_format:
        """Of the model and each batch."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def num_epochs(self, steps_per_epoch: int) -> int:
        """Epochs to train: ``ceil(steps / steps_per_epoch)`` when ``steps`` is set, else ``epochs``,
        and never fewer than ``min_steps`` need (so a 100-image set still gets a real training).
        ``min_steps`` is for a default length only: a length the user gave runs as given, so
        ``training.train_settings`` passes ``min_steps=0`` with it."""
        return max(self._asked(steps_per_epoch), math.ceil(self.min_steps / steps_per_epoch))

    def _asked(self, steps_per_epoch: int) -> int:
        return math.ceil(self.steps / steps_per_epoch) if self.steps else self.epochs

    def budget_note(self, steps_per_epoch: int) -> str | None:
        """One sentence when ``min_steps`` raised the length, else the ``default_note`` (None without one)."""
        asked, epochs = self._asked(steps_per_epoch), self.num_epochs(steps_per_epoch)
        if epochs == asked:
            return self.default_note or None
        why = self.min_steps_why or f"the minimum of {self.min_steps} steps"
        return (f"the default {asked} epochs ({asked * steps_per_epoch} steps) raised to {epochs} to reach "
                f"{why} (a length you set runs as given)")


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the local CUDA device when there is one (the LOCAL_RANK one under torchrun), else CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", spec):
        raise DistillError(f"--device must be auto, cpu, cuda or cuda:N (N a GPU index), got '{spec}'")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DistillError(f"--device {spec} asked for CUDA but no CUDA device is available (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DistillError(f"--device {spec}: there are only {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def distributed() -> tuple[int, int]:
    """``(rank, world_size)``; initialises the process group once when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main_process() -> bool:
    return distributed()[0] == 0


def barrier() -> None:
    """Wait for every process (no-op outside torchrun): e.g. until rank 0 has written a model file."""
    if dist.is_initialized():
        dist.barrier()


def _progress(desc: str) -> Progress:
    """A rich bar on a terminal; elsewhere (a log file, CI) the bar is off and ``fit`` prints one
    line per epoch instead, so a long stage is never silent."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        transient=True,
        disable=not sys.stderr.isatty(),
    )


def _val_every(epochs: int) -> int:
    return max(1, math.ceil(epochs / MAX_VALIDATIONS))


@dataclass
class _Training:
    """What ``fit`` sets up before its first epoch: the step to train, where it starts, what it restored."""

    train_step: nn.Module  # model, objective and penalty in one module (DDP-wrapped under torchrun)
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    device: torch.device
    settings: TrainSettings
    recipe: dict[str, Any]
    epochs: int
    every: int  # validate and checkpoint every this many epochs (and after the last)
    start_epoch: int
    best: dict | None  # the best validated {"score", "epoch", "model"} so far
    kept_until: int  # an older unfinished checkpoint's last epoch, kept until passed (-1: none)
    main: bool  # rank 0: prints, writes the checkpoint and the log
    log: str  # the JSONL log so far (a resumed run's earlier epochs)


def fit(
    model: nn.Module,
    objective: nn.Module,
    dataset: ImageDataset,
    sampler: BatchSampler,
    settings: TrainSettings,
    checkpoint: str | Path,
    teacher_fn: TeacherFn | None = None,
    penalty: Callable[[nn.Module], Tensor] | None = None,
    desc: str = "train",
    validate: Validator | None = None,
    recipe: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` (and the learnable parts of ``objective``) on the batches of ``sampler``
    (a batch sampler over ``dataset`` with ``set_epoch``, e.g. P x K or importance sampling; one
    with ``observe``/``state_dict`` is fed each trained batch's embeddings and checkpointed).

    A checkpoint is written atomically at the validation cadence (every ``ceil(epochs / 20)`` epochs)
    and after the last epoch, with ``recipe`` (JSON values: everything
    that shapes this training, the data's fingerprint too; default: the settings that do) and the
    epochs, steps per epoch and processes it resolved to. With ``settings.resume`` and an existing
    checkpoint, training continues from the epoch after the last one saved; one recorded with another
    recipe is refused with a ``DistillError`` naming the differences. Without ``resume``, an unfinished
    checkpoint is refused too (continue it or start over), unless ``settings.fresh``: then it is kept
    until this run has passed its epoch. Metrics go to ``<checkpoint>.jsonl`` (a fresh run replaces
    the old log once it writes its first checkpoint).
    ``penalty(model)``, when given, is added to every step's loss (e.g. Deep Ranking's L2 weight
    penalty). A NaN/inf loss stops training with a clear message, keeping the last good checkpoint.

    ``validate(model) -> scores`` (per validation query, or one number; higher is better), when
    given, runs every few epochs (at most ``MAX_VALIDATIONS`` times, and after the last epoch); the
    weights of the epoch :mod:`distill.selection` keeps (the latest one within the noise of the best
    score) are kept in the checkpoint and loaded into ``model`` at the end, and one line says which.
    Returns ``(model, summary)``: the summary dict has ``epochs`` and ``steps`` and, with validation,
    ``best_epoch``, ``best_score`` (and its standard error), the highest-scoring and the last epoch
    with their scores (``selection.summary``).

    Under torchrun, model and objective train as one DDP module (:mod:`distill.parallel`), so every
    trainable parameter gets the gradient averaged over ranks. The sampler gives each rank its share
    of the batches (built with ``rank``/``world_size``): the global batch is ``world_size`` batches,
    an epoch has ``1/world_size`` the steps, and ``lr`` is used as given. With
    ``settings.gather_embeddings`` the objective sees the global batch. Logged losses are means
    over all ranks' steps.
    """
    checkpoint = Path(checkpoint)
    settings = settings if teacher_fn is not None else replace(settings, mix_rows=0)  # mixes are for a teacher to score
    run = _set_up(model, objective, dataset, sampler, settings, checkpoint, penalty, recipe)
    if run.main and run.start_epoch == 0:
        note = settings.budget_note(len(sampler))
        mixed = f" (+{settings.mix_rows} mixed images each, --mix-rows)" if settings.mix_rows else ""
        print(f"{desc}: {run.epochs} epochs x {len(sampler)} steps{mixed}" + (f", validated every {run.every} epoch(s)" if validate else "")
              + (f"; {note}" if note else ""), file=sys.stderr)
    best = _train(run, model, objective, sampler, checkpoint, teacher_fn, desc, validate)
    if best is not None:
        model.load_state_dict(best["model"])
        if run.main:
            print(selection.selection_line(desc, best), file=sys.stderr)
    model.eval()
    return model, {"epochs": run.epochs, "steps": run.epochs * len(sampler)} | selection.summary(best)


def _set_up(
    model: nn.Module, objective: nn.Module, dataset: ImageDataset, sampler: BatchSampler, settings: TrainSettings,
    checkpoint: Path, penalty: Callable[[nn.Module], Tensor] | None, recipe: dict[str, Any] | None,
) -> _Training:
    """Seed, move to the device, build the loader, optimiser and train step, and restore what the
    checkpoint holds (:func:`distill.resume.restore`)."""
    device = torch.device(settings.device)
    rank, world = distributed()
    seed_everything(settings.seed)
    model.to(device)
    objective.to(device)
    model.to(memory_format=settings.memory_format)
    loader = DataLoader(dataset, batch_sampler=sampler, **loader_settings(device, settings.workers))
    epochs = settings.num_epochs(len(sampler))
    recipe = training_recipe(settings, recipe, epochs, len(sampler), world)
    optimizer, scheduler = _optimiser(model, objective, settings, epochs * len(sampler))
    start_epoch, best, kept_until = restore(checkpoint, settings.resume, settings.fresh, recipe, model, objective, optimizer,
                                            scheduler, sampler)

    net = torch.compile(model) if settings.compile else model
    train_step: nn.Module = TrainStep(net, objective, penalty, amp=settings.amp, gather=settings.gather_embeddings and world > 1)
    if world > 1:  # one DDP wrapper: the objective's parameters are averaged like the model's
        train_step = data_parallel(train_step, device)
    log_path = checkpoint.with_suffix(".jsonl")
    # the log is rewritten whole after each epoch: the previous run's stays until there is a new one
    log = log_path.read_text(encoding="utf-8") if start_epoch > 0 and log_path.exists() else ""
    return _Training(train_step, loader, optimizer, scheduler, device, settings, recipe, epochs, _val_every(epochs),
                     start_epoch, best, kept_until, rank == 0, log)


def _train(
    run: _Training, model: nn.Module, objective: nn.Module, sampler: BatchSampler, checkpoint: Path,
    teacher_fn: TeacherFn | None, desc: str, validate: Validator | None,
) -> dict | None:
    """The epochs from ``run.start_epoch`` on (``run.settings.mix_rows`` mixed images added to each
    batch), each validated (at the cadence), logged and checkpointed (at the cadence, on rank 0);
    returns the best validated epoch's record (or None)."""
    best, log, log_path = run.best, run.log, checkpoint.with_suffix(".jsonl")
    if validate is not None and best is None:
        best = _untrained(validate, model)
    with _progress(desc) as progress:
        task = progress.add_task(desc, total=(run.epochs - run.start_epoch) * len(sampler), info="", visible=run.main)

        def show(epoch: int, mean_loss: float) -> None:
            shown = f" val {best['score']:.3f}" if best and "score" in best else ""
            progress.update(task, advance=1, info=f"epoch {epoch + 1}/{run.epochs} loss {mean_loss:.3f}{shown}")

        for epoch in range(run.start_epoch, run.epochs):
            sampler.set_epoch(epoch)
            model.train()
            objective.train()
            record = _train_epoch(run.train_step, run.loader, run.optimizer, run.scheduler, teacher_fn, run.device,
                                  run.settings, epoch, desc, checkpoint, show)
            # validate, checkpoint (and log) at the validation cadence: a 167 MB fsynced checkpoint every epoch
            # cost the teacher 15% of its training time; an older unfinished checkpoint stays until passed
            due = (epoch + 1) % run.every == 0 or epoch + 1 == run.epochs
            if validate is not None and due:
                best = _validated(validate, model, best, epoch)
                record.update(val_score=best["last_score"], best_val_score=best["score"], best_epoch=best["epoch"])
            if run.main and progress.disable:
                _print_epoch(desc, epoch, run.epochs, record, best)
            log += json.dumps(record) + "\n"
            if run.main and due and epoch > run.kept_until:
                save(checkpoint, epoch, run.recipe, best, model, objective, run.optimizer, run.scheduler, sampler)
                atomic_write_text(log_path, log)
    return best


def _untrained(validate: Validator, model: nn.Module) -> dict:
    """The selection record before training: the untrained model validated (the reference a trained
    one must beat), with the random-number state left as it was, so training draws what it would have."""
    with torch.random.fork_rng(devices=[]):
        return selection.untrained(validate(model))


def _validated(validate: Validator, model: nn.Module, best: dict | None, epoch: int) -> dict:
    """``best`` after validating ``model`` at ``epoch`` (:func:`distill.selection.update`): the
    epoch selection keeps, with its weights, and the last score."""
    kept, keep = selection.update(best, validate(model), epoch + 1)
    return kept | {"model": copy.deepcopy(model.state_dict()) if keep else best["model"]}


def _print_epoch(desc: str, epoch: int, epochs: int, record: dict[str, float], best: dict | None) -> None:
    """One line per epoch where there is no progress bar (a log file, CI)."""
    val = f" val {record['val_score']:.3f} (best {best['score']:.3f} @ {best['epoch']})" if "val_score" in record else ""
    print(f"{desc}: epoch {epoch + 1}/{epochs} loss {record['loss']:.4f}{val} {record['images_per_s']:.0f} img/s", file=sys.stderr)


def _optimiser(
    model: nn.Module, objective: nn.Module, settings: TrainSettings, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW over every trainable parameter of model and objective, with a one-cycle schedule
    (15% warm-up) over ``total_steps``."""
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=total_steps, pct_start=0.15)
    return optimizer, scheduler



def _train_epoch(
    train_step: nn.Module, loader: DataLoader, optimizer, scheduler, teacher_fn: TeacherFn | None, device: torch.device,
    settings: TrainSettings, epoch: int, desc: str, checkpoint: Path, show: Callable[[int, float], None],
) -> dict[str, float]:
    """One pass over ``loader`` (``settings.mix_rows`` mixed images added to each batch, for
    ``teacher_fn``, which runs under the model's autocast); returns the epoch's log record: mean
    losses (over every rank's steps), epoch, last learning rate and the loaded images per second of
    all ranks."""
    world = distributed()[1]
    sampler = loader.batch_sampler
    observe = getattr(sampler, "observe", None)
    totals: dict[str, float] = {}
    seen, t0 = 0, time.perf_counter()
    for step, (images, labels, indices) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        loaded = len(labels)
        images, labels, indices = with_mixed_rows(images, labels, indices, settings.mix_rows)
        images = images.contiguous(memory_format=settings.memory_format)
        teacher_out = None
        if teacher_fn is not None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.amp):
                teacher_out = teacher_fn(images, indices)
        loss, parts, emb = train_step(images, labels, teacher_out)
        if observe is not None:
            observe(indices[:loaded], emb[:loaded], labels[:loaded])
        mean_loss = sum_over_ranks(loss).item() / world  # every rank stops when one meets NaN
        if not math.isfinite(mean_loss):
            raise DistillError(
                f"{desc}: loss became {mean_loss} at epoch {epoch + 1}, step {step + 1}; "
                f"the last good checkpoint is kept at {checkpoint}. Try a lower learning rate.",
                exit_code=1,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        for name, value in {"loss": loss.item(), **parts}.items():
            totals[name] = totals.get(name, 0.0) + value
        seen += loaded
        show(epoch, mean_loss)
    # the losses logged are the means over every rank's steps, the images those of all ranks
    summed = sum_over_ranks(torch.tensor([*totals.values(), seen], dtype=torch.float64, device=device)).tolist()
    record = {k: v / (len(sampler) * world) for k, v in zip(totals, summed)}
    record.update(epoch=epoch + 1, lr=scheduler.get_last_lr()[0], images_per_s=summed[-1] / (time.perf_counter() - t0))
    return record



@torch.inference_mode()
def extract(fn: Callable[[Tensor], Any], dataset: ImageDataset, device: torch.device, batch_size: int = 128) -> list[Tensor]:
    """Run ``fn`` (a model or a teacher) over ``dataset`` in order; concatenate each output on the CPU.

    ``fn`` returns a tensor or a tuple of tensors (``None`` entries stay ``None``).
    """
    if isinstance(fn, nn.Module):
        fn.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_settings(device, None))
    outputs: list[list[Tensor]] = []
    for images, _, _ in loader:
        out = fn(images.to(device))
        out = out if isinstance(out, tuple) else (out,)
        outputs.append([o.float().cpu() if o is not None else None for o in out])
    return [None if col[0] is None else torch.cat(col) for col in zip(*outputs)]
