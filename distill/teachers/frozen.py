"""Frozen teachers: ``teacher(images) -> (L2-normalised embedding, logits or None)``, no gradients.

``load_teacher`` takes any teacher spec (``distill.models.parse_spec``): ``onnx:PATH`` runs in ONNX
Runtime; a builtin, ``timm:NAME`` or ``torchvision:NAME`` comes with local weights, either a
distill model file or a plain state dict of the finished model, used as it is (``FinishedModel``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DistillError, load_error_reason
from distill.models import NotAModelFile, load_model, model_cfg, parse_spec, read_state_dict
from distill.models.file import check_state_dict
from distill.models.library import library_classifier
from distill.models.registry import build_model
from distill.teachers.finished import FinishedModel, at_layer


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes (first 16 hex digits): a cache key that changes with the weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class Teacher:
    """A frozen teacher: ``teacher(images) -> (L2-normalised embedding, logits or None)``, no gradients.

    Outputs come back on the device of ``images``. ``module`` is the PyTorch model (None for ONNX).
    Setting ``has_logits`` to False turns the logits off (KD then has none to learn from).
    """

    spec: str
    embed_dim: int
    has_logits: bool
    num_classes: int | None  # size of the logits (None without)
    fingerprint: str
    module: nn.Module | None = None

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


class TorchTeacher(Teacher):
    def __init__(self, spec: str, module: nn.Module, fingerprint: str) -> None:
        self.spec, self.module, self.fingerprint = spec, module.eval().requires_grad_(False), fingerprint
        self.embed_dim, self.num_classes, self.has_logits = module.embed_dim, module.num_classes, True

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        self.module.eval()
        device = next(self.module.parameters()).device
        emb, logits = self.module(images.to(device))
        return emb.to(images.device), (logits.to(images.device) if self.has_logits else None)


class OnnxTeacher(Teacher):
    """Runs an ONNX model in ONNX Runtime; its first output is the embedding, a second one the logits."""

    def __init__(self, spec: str, path: Path, device: torch.device) -> None:
        import onnxruntime as ort

        cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as err:
            raise DistillError(f"cannot load ONNX teacher {path}: {load_error_reason(err)}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        emb_shape = outputs[0].shape
        if len(inputs) != 1 or len(emb_shape) != 2 or not isinstance(emb_shape[1], int):
            raise DistillError(f"ONNX teacher {path} must take one image input and give a [batch, dim] first output")
        self.spec, self.path, self.fingerprint = spec, path, file_fingerprint(path)
        self.embed_dim, self.has_logits = emb_shape[1], len(outputs) > 1
        self.num_classes = outputs[1].shape[-1] if self.has_logits else None
        self.input_name, self.input_shape = inputs[0].name, inputs[0].shape
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        self.output_names = [o.name for o in outputs[: 1 + self.has_logits]]

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        if len(self.input_shape) != images.dim() or any(
            isinstance(want, int) and want != got for want, got in zip(self.input_shape, images.shape)
        ):
            raise DistillError(
                f"ONNX teacher {self.path} takes input of shape {self.input_shape}, got {tuple(images.shape)}: "
                "export it with a dynamic batch axis and the run's image size"
            )
        feed = {self.input_name: images.detach().float().cpu().numpy().astype(self.input_dtype)}
        outs = [torch.from_numpy(o).float().to(images.device) for o in self.session.run(self.output_names, feed)]
        return F.normalize(outs[0], dim=1), (outs[1] if self.has_logits else None)


def finished_model(spec: str, state: dict[str, Tensor], layer: str | None = None) -> FinishedModel:
    """The network ``spec`` names, with ``state`` (its plain state dict) loaded, as it is: a builtin
    sized from the state dict (its ``proj`` and ``classifier`` weights), or the whole library classifier."""
    parsed = parse_spec(spec)
    if parsed.kind == "builtin":
        embed_dim, num_classes = (state[k].shape[0] if k in state else 1 for k in ("proj.weight", "classifier.weight"))
        net, mode = build_model(spec, embed_dim, num_classes), "pair"
    else:
        net, mode = library_classifier(parsed.kind, parsed.name, state), parsed.kind if parsed.kind == "timm" else "classifier"
    hint = (
        f"\n(is it {spec}'s state dict? To fine-tune backbone weights on the task data first, pass --teacher-finetune)"
    )
    check_state_dict(net, state, f"{spec} weights", hint)
    net.load_state_dict(state)
    return FinishedModel(net, mode, model_cfg(spec), layer)


def load_teacher(
    spec: str, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu", layer: str | None = None
) -> Teacher:
    """A frozen, eval-mode teacher: ``onnx:PATH``, or ``spec`` with ``weights`` (a distill model file
    or a plain state dict of the finished model); ``layer`` names the layer that gives the embedding."""
    device = torch.device(device)
    parsed = parse_spec(spec)
    if parsed.kind == "onnx":
        path = Path(parsed.name)
        if weights is not None:
            raise DistillError(f"'{spec}' carries its own weights; drop --teacher-weights")
        if layer is not None:
            raise DistillError(f"'{spec}' runs in ONNX Runtime, so --teacher-layer cannot pick its layers; drop it")
        if not path.is_file():
            raise DistillError(f"ONNX teacher file {path} does not exist")
        return OnnxTeacher(spec, path, device)
    if weights is None:
        if parsed.kind != "builtin":
            raise DistillError(f"teacher '{spec}' needs a local weights file (nothing is downloaded): pass --teacher-weights PATH")
        raise DistillError(
            f"teacher '{spec}' has no weights: pass --teacher-weights PATH (a model file from `distill train-teacher`)"
        )
    fingerprint = file_fingerprint(weights) if Path(weights).is_file() else ""
    if layer is not None:  # another layer, another embedding: another cache key
        fingerprint = hashlib.sha256(f"{fingerprint}@{layer}".encode()).hexdigest()[:16]
    try:
        model, info = load_model(weights)
    except NotAModelFile:
        return TorchTeacher(spec, finished_model(spec, read_state_dict(weights), layer).to(device), fingerprint)
    if info["arch"] != spec:
        raise DistillError(f"{weights} holds a '{info['arch']}' model, not '{spec}': pass --teacher {info['arch']}")
    return TorchTeacher(spec, at_layer(model, spec, layer).to(device), fingerprint)
