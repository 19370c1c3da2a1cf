"""``--teacher-layer auto``: take the teacher's embedding from the layer that retrieves best on validation.

A network trained on few classes fits its last layers to those classes: on class-disjoint test sets
its earlier, more generic layers often rank unseen classes better (Yosinski et al. 2014, "How
transferable are features in deep neural networks?"). Which layer is best depends on the data, so it
is measured on the held-out validation identities, never on the test set: the candidates are the
model's own embedding and the global-average-pooled output of each of its feature layers.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from distill.models import model_cfg, parse_spec
from distill.teachers.finished import FinishedModel
from distill.teachers.frozen import Teacher

EMBEDDING = "embedding"  # the --teacher-layer value (and score key) of the model's own embedding


def feature_layers(spec: str, module: nn.Module | None) -> list[str]:
    """The layers ``auto`` tries, shallow to deep: a builtin's registered ``feature_layers`` or a timm
    network's ``feature_info`` stages (none for ONNX and torchvision teachers: only their embedding)."""
    if module is None:
        return []
    if parse_spec(spec).kind == "builtin":
        return list(model_cfg(spec).feature_layers)
    net = module.net if isinstance(module, FinishedModel) else module
    for prefix, sub in net.named_modules():
        info = getattr(sub, "feature_info", None)
        if isinstance(info, list) and all(isinstance(f, dict) and "module" in f for f in info):
            return [f"{prefix}.{f['module']}" if prefix else f["module"] for f in info]
    return []


def choose_layer(
    load: Callable[[str | None], Teacher], layers: list[str], score: Callable[[Teacher], float]
) -> tuple[Teacher, dict[str, float]]:
    """The teacher (``load(layer)``, None = its embedding) whose ``score`` is highest, and every score.

    Ties go to the embedding, then to the deeper layer (a smaller change from the model as trained).
    """
    scores: dict[str, float] = {}
    best, best_score = None, float("-inf")
    for layer in [None, *reversed(layers)]:
        teacher = load(layer)
        scores[layer or EMBEDDING] = value = score(teacher)
        if value > best_score:
            best, best_score = teacher, value
    return best, scores
