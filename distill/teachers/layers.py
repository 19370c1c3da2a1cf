"""``--teacher-layer auto``: take the teacher's embedding from the layer that retrieves best on validation.

A network trained on few classes fits its last layers to those classes: on class-disjoint test sets
its earlier, more generic layers often rank unseen classes better (Yosinski et al. 2014, "How
transferable are features in deep neural networks?"). Which layer is best depends on the data, so it
is measured on the held-out validation identities, never on the test set: the candidates are the
model's own embedding and the global-average-pooled output of each of its feature layers, all
read in one forward pass (``PooledLayers``).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from distill.models import model_cfg, parse_spec
from distill.teachers.finished import FinishedModel, pooled_embedding

EMBEDDING = "embedding"  # the --teacher-layer value (and score key) of the model's own embedding


def feature_layers(spec: str, module: nn.Module | None) -> list[str]:
    """The layers ``auto`` tries, shallow to deep: a builtin's registered ``feature_layers`` or a timm
    network's ``feature_info`` stages (none for ONNX and torchvision teachers: only their embedding)."""
    if module is None:
        return []
    if parse_spec(spec).kind == "builtin":
        return list(model_cfg(spec).feature_layers)
    for prefix, sub in _root(module).named_modules():
        info = getattr(sub, "feature_info", None)
        if isinstance(info, list) and all(isinstance(f, dict) and "module" in f for f in info):
            return [f"{prefix}.{f['module']}" if prefix else f["module"] for f in info]
    return []


def _root(module: nn.Module) -> nn.Module:
    """The network that layer names are relative to (the one a ``FinishedModel`` wraps)."""
    return module.net if isinstance(module, FinishedModel) else module


class PooledLayers(nn.Module):
    """``images -> (embedding, pooled embedding of layers[0], ...)``: every candidate in one forward pass.

    ``module`` is a frozen teacher's network (``Teacher.module``); call ``close()`` to remove the hooks.
    """

    def __init__(self, module: nn.Module, layers: list[str]) -> None:
        super().__init__()
        self.module, self.layers, self._outputs = module, list(layers), {}
        modules = dict(_root(module).named_modules())
        self._hooks = [modules[name].register_forward_hook(partial(self._keep, name)) for name in self.layers]

    def _keep(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._outputs[name] = output

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        emb = self.module(images)[0]
        return (emb, *(pooled_embedding(self._outputs.pop(name)) for name in self.layers))

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def choose_layer(scores: dict[str, float]) -> str:
    """The name with the highest score; ties go to the one listed first (the caller lists the
    embedding first, then the layers from deep to shallow: the smallest change from the model as trained)."""
    return max(scores, key=scores.__getitem__)
