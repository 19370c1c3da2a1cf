"""Continuing a training from its checkpoint: the recipe a checkpoint records (what shapes the
training), the refusal of a checkpoint made with another one or left unfinished, and every state
``fit`` saves and restores (model, objective, optimiser, schedule, sampler, RNGs, best epoch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from distill.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from distill.errors import DistillError

# What shapes a training when the caller gives no recipe, and what fit derives from it and the data:
# a checkpoint records them, and --resume refuses one whose record differs.
SETTINGS_RECIPE = (
    "epochs", "steps", "min_steps", "lr", "weight_decay", "seed", "amp", "channels_last", "gather_embeddings", "mix_rows",
)
DERIVED_RECIPE = ("total_epochs", "steps_per_epoch", "world_size")


def training_recipe(
    settings: Any, recipe: dict[str, Any] | None, epochs: int, steps_per_epoch: int, world: int
) -> dict[str, Any]:
    """What a checkpoint records as its training's recipe (JSON values): the caller's ``recipe`` (or the
    fields of ``settings``, a ``distill.engine.TrainSettings``, named in ``SETTINGS_RECIPE``) plus
    the epochs, steps per epoch and processes it resolved to."""
    own = recipe if recipe is not None else {k: getattr(settings, k) for k in SETTINGS_RECIPE}
    derived = {"total_epochs": epochs, "steps_per_epoch": steps_per_epoch, "world_size": world}
    return json.loads(json.dumps(own | derived))


def recipe_differences(stored: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """``key=stored (now value)`` for each difference; those derived from the options (epochs, steps
    per epoch, processes) only when nothing else differs, as they follow from the rest."""
    if not isinstance(stored, dict):
        return ["it records no settings (written by an older distill)"]
    missing = object()
    keys = [k for k in dict.fromkeys([*now, *stored]) if stored.get(k, missing) != now.get(k, missing)]
    primary = [k for k in keys if k not in DERIVED_RECIPE]

    def show(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{k}={show(stored.get(k))} (now {show(now.get(k))})" for k in primary or keys]


def _unfinished(checkpoint: Path, fresh: bool, recipe: dict[str, Any]) -> int:
    """For a run without ``resume``: the last epoch of the unfinished training in ``checkpoint``, which
    a ``fresh`` run keeps until it has passed it (-1: none, or a finished or unreadable checkpoint,
    which may be replaced); without ``fresh`` an unfinished one is refused, saying how to go on."""
    try:
        state = load_checkpoint(checkpoint)
    except DistillError:
        return -1
    done, total = state["epoch"] + 1, state.get("recipe", {}).get("total_epochs")
    if total is None or done >= total:
        return -1
    if fresh:
        return state["epoch"]
    diffs = recipe_differences(state.get("recipe"), recipe)
    how = ("continue it with --resume" if not diffs else
           f"it was made with other settings or data ({'; '.join(diffs)}): rerun with those and --resume to continue it")
    raise DistillError(
        f"{checkpoint} holds an unfinished training ({done} of {total} epochs done): {how}, or start over with --fresh "
        f"(it is kept until the new run passes epoch {done})"
    )


def restore(
    checkpoint: Path, resume: bool, fresh: bool, recipe: dict[str, Any], model: nn.Module, objective: nn.Module, optimizer,
    scheduler, sampler,
) -> tuple[int, dict | None, int]:
    """Load the checkpoint's states (with ``resume`` and when it exists): ``(first epoch to train,
    best validated {"score", "epoch", "model"} or None, -1)``; for a fresh run ``(0, None, the last
    epoch of an unfinished checkpoint to keep until passed, or -1)``."""
    if not checkpoint.exists():
        return 0, None, -1
    if not resume:
        return 0, None, _unfinished(checkpoint, fresh, recipe)
    state = load_checkpoint(checkpoint)
    diffs = recipe_differences(state.get("recipe"), recipe)
    if diffs:
        raise DistillError(
            f"cannot resume from {checkpoint}: it was made with other settings or data: {'; '.join(diffs)} "
            "(rerun with those to continue it, or start over with --fresh)"
        )
    model.load_state_dict(state["model"])
    objective.load_state_dict(state["objective"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "sampler" in state:
        sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    return state["epoch"] + 1, state.get("best"), -1


def save(
    checkpoint: Path, epoch: int, recipe: dict[str, Any], best: dict | None, model: nn.Module,
    objective: nn.Module, optimizer, scheduler, sampler,
) -> None:
    """Write every state :func:`restore` needs (the sampler's when it has one) and the recipe atomically."""
    state = {
        "recipe": recipe,
        "model": model.state_dict(),
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "epoch": epoch,
        "best": best,
    }
    if hasattr(sampler, "state_dict"):
        state["sampler"] = sampler.state_dict()
    save_checkpoint(checkpoint, state)
