"""Model files: our format (weights plus what is needed to rebuild the architecture) and plain
state dicts (``.safetensors``, or ``.pt``/``.pth`` read with ``weights_only``).

``.pt`` (any suffix but ``.safetensors``): a ``torch.save`` dict ``{"format": "distill-model-v1",
"arch", "embed_dim", "num_classes", "width", "multiscale", "meta", "model": state_dict}``, read back
with ``torch.load(weights_only=True)`` (no pickled code runs). ``.safetensors``: the state dict,
with the same fields as string metadata (``meta`` as JSON). Files are written atomically.
A file that is not ours raises ``NotAModelFile`` (then it may be a plain state dict).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.atomic import atomic_torch_save, atomic_write_bytes
from distill.errors import DistillError, load_error_reason
from distill.models.library import LibraryBackbone
from distill.models.registry import build_model
from distill.multiscale import MultiScaleNet

FORMAT = "distill-model-v1"
MAX_ROWS = 6  # rows of the key table a mismatch error shows


class NotAModelFile(DistillError):
    """The file exists but is not a distill model file (a plain state dict, or no weights at all)."""


def save_model(
    path: str | os.PathLike, model: nn.Module, arch: str, *, width: float = 1.0, multiscale: bool | None = None, **meta: Any
) -> Path:
    """Write ``model`` (built by ``build_model(arch, ..., width)``, maybe in a ``MultiScaleNet``) and JSON-able ``meta``."""
    is_multiscale = isinstance(model, MultiScaleNet)
    if multiscale is not None and multiscale != is_multiscale:
        raise ValueError(f"multiscale={multiscale} but the model is {'' if is_multiscale else 'not '}a MultiScaleNet")
    json.dumps(meta)  # fail here, not at load time, on values neither format can store
    header = {
        "format": FORMAT,
        "arch": arch,
        "embed_dim": int(model.embed_dim),
        "num_classes": int(model.num_classes),
        "width": float(width),
        "multiscale": is_multiscale,
        "meta": meta,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        metadata = {k: json.dumps(v) for k, v in header.items()}
        return atomic_write_bytes(path, save(state, metadata=metadata))
    return atomic_torch_save(header | {"model": state}, path)


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(header, state_dict)`` of a distill model file, on the CPU, without building the model."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"model file {path} does not exist")
    not_ours = f"{path} is not a distill model file"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise NotAModelFile(f"{not_ours} (unreadable safetensors: {load_error_reason(err)})") from None
        if metadata.get("format") != json.dumps(FORMAT):
            raise NotAModelFile(f"{not_ours} (no '{FORMAT}' metadata; is it a plain state dict?)")
        return {k: json.loads(v) for k, v in metadata.items()}, state
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors all mean "not a file we wrote"
        raise NotAModelFile(f"{not_ours} (torch.load failed: {load_error_reason(err)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise NotAModelFile(f"{not_ours} (no '{FORMAT}' header; is it a plain state dict?)")
    state = data.pop("model", None)
    if not isinstance(state, dict):
        raise NotAModelFile(f"{not_ours} (it has no 'model' weights)")
    return data, state


def recorded_arch(path: str | os.PathLike) -> tuple[str, float] | None:
    """``(architecture spec, width)`` a distill model file records; None for anything else (a plain
    state dict, a missing or unreadable file: those are reported where the weights are loaded)."""
    try:
        header, _ = read_model_file(path)
    except DistillError:
        return None
    return str(header["arch"]), float(header.get("width", 1.0))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture a model file names, load its weights; returns ``(model in eval mode, header)``."""
    header, state = read_model_file(path)
    model = build_model(header["arch"], header["embed_dim"], header["num_classes"], header["width"])
    model = MultiScaleNet(model) if header["multiscale"] else model
    check_state_dict(model, state, f"model file {path} ({header['arch']})")
    model.load_state_dict(state)
    return model.to(device).eval(), header


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str, hint: str = "") -> None:
    """One DistillError with a short table of the missing, unexpected and differently shaped keys
    (the first ``MAX_ROWS``), followed by ``hint``; nothing when ``state`` fits ``model``."""
    expected = model.state_dict()
    missing = [f"  missing key '{k}' {tuple(v.shape)}" for k, v in expected.items() if k not in state]
    unexpected = [f"  unexpected key '{k}' {tuple(v.shape)}" for k, v in state.items() if k not in expected]
    shapes = [
        f"  '{k}' has shape {tuple(state[k].shape)} in the file but {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    rows = missing + unexpected + shapes
    if rows:
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} with another shape"
        more = [f"  ... and {len(rows) - MAX_ROWS} more"] if len(rows) > MAX_ROWS else []
        raise DistillError("\n".join([f"{what} does not match the model ({counts}):", *rows[:MAX_ROWS], *more]) + hint)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from ``.safetensors`` or ``.pt``/``.pth`` (``weights_only``), unwrapping
    ``{"state_dict": ...}``/``{"model": ...}`` and a DDP ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DistillError(f"cannot read weights file {path}: {load_error_reason(err)}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DistillError(f"weights file {path} holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_backbone_weights(model: nn.Module, path: str | os.PathLike, hint: str = "") -> None:
    """Load ImageNet-style weights into ``model.backbone`` (from ``build_model``), ignoring the
    library's classifier keys; the embedding and classifier heads keep their fresh initialisation.
    ``hint`` ends the mismatch error."""
    backbone = model.backbone
    target, head = (backbone.body, backbone.head_prefixes) if isinstance(backbone, LibraryBackbone) else (backbone, ())
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(head)}
    expected = target.state_dict()
    # files saved before BatchNorm counted its batches lack these counters; keep ours
    state = {k: v for k, v in expected.items() if k.endswith("num_batches_tracked")} | state
    check_state_dict(target, state, f"backbone weights {path}", hint)
    target.load_state_dict(state)
