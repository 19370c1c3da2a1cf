"""Teacher registry: build a trainable teacher, load ImageNet backbone weights, load a frozen teacher.

Specs: a builtin name (``inception_bn``), ``timm:NAME``, ``torchvision:NAME`` (architecture from
the library, weights only from local files: nothing is ever downloaded), ``onnx:PATH`` (a teacher
that runs in ONNX Runtime), and any architecture saved in a distill model file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.embedding import EmbeddingNet
from distill.errors import DistillError, load_error_reason
from distill.modelfile import check_state_dict, load_model
from distill.students import student_names, timm_model
from distill.students.registry import LibraryBackbone
from distill.teachers.inception_bn import inception_bn

TEACHERS: dict[str, Callable[..., nn.Module]] = {"inception_bn": inception_bn}
# the first pooling/head node of a torchvision classifier; the node before it gives the feature map
_HEAD_NODES = {"avgpool", "adaptive_avg_pool2d", "mean", "flatten", "dropout", "classifier", "fc", "head", "heads"}


def teacher_names() -> list[str]:
    return sorted(TEACHERS)


def _unknown_teacher(spec: str) -> DistillError:
    known = teacher_names() + ["timm:<name>", "torchvision:<name>", "onnx:<path>"]
    return DistillError(f"unknown teacher '{spec}'; known: {', '.join(known)}")


def torchvision_model(name: str, embed_dim: int, num_classes: int) -> EmbeddingNet:
    """``torchvision:NAME``: the classification network cut before its pooling (weights=None) + embedding head."""
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise DistillError(f"unknown torchvision model '{name}' (see torchvision.models.list_models())")
    full = torchvision.models.get_model(name, weights=None)
    nodes = {}
    for mode, names in zip(("train", "eval"), get_graph_node_names(full)):
        heads = [i for i, node in enumerate(names) if node.split(".")[0] in _HEAD_NODES]
        if not heads or heads[0] == 0:
            raise DistillError(f"torchvision model '{name}' has no recognisable classifier head to cut off")
        nodes[mode] = {names[heads[0] - 1]: "features"}
    body = create_feature_extractor(full, train_return_nodes=nodes["train"], eval_return_nodes=nodes["eval"])
    dropped = tuple(sorted({key.split(".")[0] + "." for key in set(full.state_dict()) - set(body.state_dict())}))
    backbone = LibraryBackbone(body, dropped, output_key="features")
    return EmbeddingNet(backbone, backbone.feature_dim(f"torchvision:{name}"), embed_dim, num_classes)


def build_teacher_model(spec: str, embed_dim: int, num_classes: int, width: float = 1.0) -> nn.Module:
    """A trainable teacher (for ``train-teacher``): builtin, ``timm:NAME`` or ``torchvision:NAME``."""
    kind, _, name = spec.partition(":")
    if spec in TEACHERS:
        return TEACHERS[spec](embed_dim, num_classes, width=width)
    if kind == "onnx":
        raise DistillError(f"'{spec}' runs in ONNX Runtime and cannot be trained; use it as a frozen teacher")
    if kind not in ("timm", "torchvision") or not name:
        raise _unknown_teacher(spec)
    if width != 1.0:
        raise DistillError(f"a width multiplier applies to builtin teachers only, not '{spec}'")
    return timm_model(name, embed_dim, num_classes) if kind == "timm" else torchvision_model(name, embed_dim, num_classes)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
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
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DistillError(f"weights file {path} holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load ImageNet-style weights into ``model.backbone`` (from ``build_teacher_model``), ignoring the
    library's classifier keys; the embedding and classifier heads keep their fresh initialisation."""
    backbone = model.backbone
    target, head = (backbone.body, backbone.head_prefixes) if isinstance(backbone, LibraryBackbone) else (backbone, ())
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(head)}
    expected = target.state_dict()
    # files saved before BatchNorm counted its batches lack these counters; keep ours
    state = {k: v for k, v in expected.items() if k.endswith("num_batches_tracked")} | state
    check_state_dict(target, state, f"backbone weights {path}")
    target.load_state_dict(state)


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
    """

    spec: str
    embed_dim: int
    has_logits: bool
    fingerprint: str
    module: nn.Module | None = None

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


class TorchTeacher(Teacher):
    def __init__(self, spec: str, module: nn.Module, fingerprint: str) -> None:
        self.spec, self.module, self.fingerprint = spec, module.eval().requires_grad_(False), fingerprint
        self.embed_dim, self.has_logits = module.embed_dim, True

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        self.module.eval()
        device = next(self.module.parameters()).device
        emb, logits = self.module(images.to(device))
        return emb.to(images.device), logits.to(images.device)


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


def load_teacher(spec: str, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Teacher:
    """A frozen, eval-mode teacher from ``onnx:PATH`` or from a distill model file (``weights``)."""
    device = torch.device(device)
    kind, _, name = spec.partition(":")
    if kind == "onnx":
        path = Path(name)
        if weights is not None:
            raise DistillError(f"'{spec}' carries its own weights; drop --teacher-weights")
        if not path.is_file():
            raise DistillError(f"ONNX teacher file {path} does not exist")
        return OnnxTeacher(spec, path, device)
    library = kind in ("timm", "torchvision") and name
    if not (library or spec in TEACHERS or spec in student_names()):
        raise _unknown_teacher(spec)
    if weights is None:
        if library:
            raise DistillError(f"teacher '{spec}' needs a local weights file (nothing is downloaded): pass --teacher-weights PATH")
        raise DistillError(
            f"teacher '{spec}' has no weights: pass --teacher-weights PATH (a model file from `distill train-teacher`)"
        )
    try:
        model, info = load_model(weights, device)
    except DistillError as err:
        if "is not a distill model file" not in str(err):
            raise
        raise DistillError(
            f"{weights} is not a distill model file; to start from backbone (e.g. ImageNet) weights, train the "
            f"teacher first: distill train-teacher --teacher {spec} --teacher-weights {weights}"
        ) from None
    if info["arch"] != spec:
        raise DistillError(f"{weights} holds a '{info['arch']}' model, not '{spec}': pass --teacher {info['arch']}")
    return TorchTeacher(spec, model, file_fingerprint(weights))
