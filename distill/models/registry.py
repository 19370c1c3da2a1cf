"""One place that turns a model spec into a network (timm's ``_registry`` way).

A spec is a builtin name registered with ``@register_model`` (``inception_bn``, ``nin_bn``),
``timm:NAME`` or ``torchvision:NAME`` (the library's architecture; weights only from local files,
nothing is downloaded) or ``onnx:PATH`` (a model run by ONNX Runtime). ``parse_spec`` is the only
parser of these prefixes. Every model has a default config (``ModelCfg``: input size, mean/std,
embedding size): builtins register theirs, timm models bring their ``pretrained_cfg``,
torchvision models take ImageNet's normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from distill.errors import DistillError
from distill.models.library import timm_cfg, timm_model, torchvision_model

ModelBuilder = Callable[..., nn.Module]
# The input normalisation of a model whose ModelCfg gives no mean/std (every builtin): ImageNet's.
# The data transforms normalise with it; a finished teacher re-normalises to its own (teachers.finished).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROLES = ("teacher", "student")
# the spec prefixes each role accepts, besides builtin names
PREFIXES = {"teacher": ("timm", "torchvision", "onnx"), "student": ("timm",)}


@dataclass(frozen=True)
class ModelCfg:
    """What a model expects: input size ``(H, W)``, per-channel mean/std of its input normalisation
    (None: ``IMAGENET_MEAN``/``IMAGENET_STD``, what the data transforms give), its usual embedding size (None: the run's) and
    the layers ``--teacher-layer auto`` tries besides its embedding."""

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    embed_dim: int | None = None
    feature_layers: tuple[str, ...] = ()  # layers whose pooled output may serve as the embedding, shallow to deep


@dataclass(frozen=True)
class Builtin:
    builder: ModelBuilder
    role: str
    cfg: ModelCfg


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``kind`` is ``builtin``, ``timm``, ``torchvision`` or ``onnx``; ``name`` the rest."""

    kind: str
    name: str

    def __str__(self) -> str:
        return self.name if self.kind == "builtin" else f"{self.kind}:{self.name}"


_MODELS: dict[str, Builtin] = {}


def register_model(name: str, role: str, cfg: ModelCfg | None = None) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: make ``builder(embed_dim, num_classes, width=1.0)`` (a network returning
    ``(L2-normalised embedding, logits)``) available as ``name``, listed among the ``role``'s models."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got '{role}'")

    def register(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS or ":" in name:
            raise ValueError(f"model name '{name}' is already registered or contains ':'")
        _MODELS[name] = Builtin(builder, role, cfg or ModelCfg())
        return builder

    return register


def model_names(role: str | None = None) -> list[str]:
    """Registered builtin names (of one role, or all)."""
    return sorted(name for name, entry in _MODELS.items() if role in (None, entry.role))


def parse_spec(spec: str, role: str = "teacher") -> ModelSpec:
    """Split ``spec`` into kind and name; DistillError naming what ``role`` accepts when it is unknown.

    Any builtin may be used in either role (a student can teach); prefixes are ``PREFIXES[role]``.
    """
    kind, sep, name = spec.partition(":")
    if not sep and spec in _MODELS:
        return ModelSpec("builtin", spec)
    if sep and name and kind in PREFIXES[role]:
        return ModelSpec(kind, name)
    known = model_names(role) + [f"{p}:<{'path' if p == 'onnx' else 'name'}>" for p in PREFIXES[role]]
    raise DistillError(f"unknown {role} '{spec}'; known: {', '.join(known)}")


def build_model(spec: str, embed_dim: int, num_classes: int, width: float = 1.0, role: str = "teacher") -> nn.Module:
    """A trainable network ``images -> (L2-normalised embedding, logits)``: a builtin, or a timm /
    torchvision backbone (random init) with an embedding head."""
    parsed = parse_spec(spec, role)
    if parsed.kind == "onnx":
        raise DistillError(f"'{spec}' runs in ONNX Runtime and cannot be trained; use it as a frozen teacher")
    if not width > 0:
        raise DistillError(f"{role} width must be positive, got {width}")
    if parsed.kind == "builtin":
        return _MODELS[parsed.name].builder(embed_dim, num_classes, width=width)
    if width != 1.0:
        raise DistillError(f"a width multiplier applies to builtin models only, not '{spec}' (its name sets its size)")
    build = timm_model if parsed.kind == "timm" else torchvision_model
    return build(parsed.name, embed_dim, num_classes)


def model_cfg(spec: str) -> ModelCfg:
    """The default config of ``spec``: registered (builtins), timm's ``pretrained_cfg``, or ImageNet's."""
    parsed = parse_spec(spec)
    if parsed.kind == "builtin":
        return _MODELS[parsed.name].cfg
    cfg = timm_cfg(parsed.name) if parsed.kind == "timm" else {}
    if "input_size" not in cfg:
        return ModelCfg()
    return ModelCfg(input_size=tuple(cfg["input_size"][1:]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
