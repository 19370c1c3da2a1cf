"""The one model-file format: weights plus what is needed to rebuild the architecture.

``.pt`` (any suffix but ``.safetensors``): a ``torch.save`` dict ``{"format": "distill-model-v1",
"arch", "embed_dim", "num_classes", "width", "multiscale", "meta", "model": state_dict}``, read back
with ``torch.load(weights_only=True)`` (no pickled code runs). ``.safetensors``: the state dict,
with the same fields as string metadata (``meta`` as JSON). Files are written atomically.
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

FORMAT = "distill-model-v1"


def build_model(arch: str, embed_dim: int, num_classes: int, width: float = 1.0, multiscale: bool = False) -> nn.Module:
    """Any architecture by name: a registered student, a builtin teacher, ``timm:``/``torchvision:``."""
    # imported here: the teacher registry itself loads model files through this module
    from distill.multiscale import MultiScaleNet
    from distill.students import create_student, student_names
    from distill.teachers.registry import build_teacher_model

    if arch in student_names() or arch.startswith("timm:"):
        return create_student(arch, embed_dim, num_classes, width=width, multiscale=multiscale)
    model = build_teacher_model(arch, embed_dim, num_classes, width=width)
    return MultiScaleNet(model) if multiscale else model


def save_model(
    path: str | os.PathLike, model: nn.Module, arch: str, *, width: float = 1.0, multiscale: bool | None = None, **meta: Any
) -> Path:
    """Write ``model`` (built by ``build_model(arch, ..., width, multiscale)``) and JSON-able ``meta``."""
    from distill.multiscale import MultiScaleNet

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
            raise DistillError(f"{not_ours} (unreadable safetensors: {load_error_reason(err)})") from None
        if metadata.get("format") != json.dumps(FORMAT):
            raise DistillError(f"{not_ours} (no '{FORMAT}' metadata; is it a plain state dict?)")
        return {k: json.loads(v) for k, v in metadata.items()}, state
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors all mean "not a file we wrote"
        raise DistillError(f"{not_ours} (torch.load failed: {load_error_reason(err)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DistillError(f"{not_ours} (no '{FORMAT}' header; is it a plain state dict?)")
    state = data.pop("model", None)
    if not isinstance(state, dict):
        raise DistillError(f"{not_ours} (it has no 'model' weights)")
    return data, state


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture a model file names, load its weights; returns ``(model in eval mode, header)``."""
    header, state = read_model_file(path)
    model = build_model(header["arch"], header["embed_dim"], header["num_classes"], header["width"], header["multiscale"])
    check_state_dict(model, state, f"model file {path} ({header['arch']})")
    model.load_state_dict(state)
    return model.to(device).eval(), header


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """DistillError naming the first missing, unexpected or differently shaped key."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise DistillError(f"{what} does not match the model: missing key '{key}'")
        if tuple(state[key].shape) != tuple(value.shape):
            raise DistillError(
                f"{what} does not match the model: '{key}' has shape {tuple(state[key].shape)} in the file "
                f"but {tuple(value.shape)} in the model"
            )
    for key in state:
        if key not in expected:
            raise DistillError(f"{what} does not match the model: unexpected key '{key}'")
