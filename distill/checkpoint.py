"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)`` only.

A checkpoint holds tensors, containers and plain Python values; the RNG states are stored in that
form too (``rng_state``), so no pickled code is ever run on ``--resume``. A file that needs more
(a foreign or malicious pickle), is empty or cut short is refused with one ``DistillError`` line.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.atomic import WriteError, atomic_torch_save
from distill.errors import DistillError, load_error_reason

KEYS = ("model", "objective", "optimizer", "scheduler", "rng", "epoch")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors and plain types) atomically; a full disk is one ``DistillError`` line."""
    try:
        return atomic_torch_save(state, path)
    except (WriteError, OSError, RuntimeError) as err:
        reason = err.reason if isinstance(err, WriteError) else load_error_reason(err)
        raise DistillError(
            f"cannot write checkpoint {path}: {reason}; the previous checkpoint is kept "
            "(free disk space or choose another --out)",
            exit_code=1,
        ) from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` on the CPU, never running pickled code."""
    path = Path(path)
    fix = f"delete {path} to start afresh, or run without --resume"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors all mean "not a checkpoint we wrote"
        raise DistillError(f"cannot resume from {path}: {load_error_reason(err)} ({fix})") from None
    missing = [k for k in KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise DistillError(f"cannot resume from {path}: it is not a distill checkpoint (no {', '.join(missing)}) ({fix})")
    return state


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain types (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": list(random.getstate()),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files our atomic writes leave when killed (``.NAME.XXXX.tmp``) in ``directory``.

    Call it while holding the directory's lock (``distill.outdir``): then no write is in progress.
    A warning names what was removed; the list is returned.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.glob(".*.tmp")):
        try:
            if path.is_file():
                path.unlink()
                removed.append(path)
        except OSError:
            continue  # gone already, or not ours to delete
    if removed:
        warnings.warn(f"removed {len(removed)} temp file(s) left by an interrupted run: {', '.join(p.name for p in removed)}")
    return removed
