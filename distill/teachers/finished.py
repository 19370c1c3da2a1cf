"""A finished network used as a teacher as it is: ``images -> (L2-normalised embedding, logits)``.

The embedding is the network's pooled features (timm: ``forward_features`` then
``forward_head(pre_logits=True)``; torchvision: the input of its last Linear layer, the classifier;
our own networks: their embedding) or the output of a named layer (global-average-pooled when it
is a feature map). The batch arrives normalised with the models' default mean/std (ImageNet's,
``distill.models.IMAGENET_MEAN``/``IMAGENET_STD``, what the data transforms use) and is re-normalised to the model's own: ``x' = (x * std_in + mean_in - mean) / std``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DistillError
from distill.models import IMAGENET_MEAN, IMAGENET_STD, ModelCfg, model_cfg

MODES = ("timm", "classifier", "pair")  # timm API | any classifier (hook on its last Linear) | (emb, logits) net


class FinishedModel(nn.Module):
    """Wraps ``net`` (see the module docstring); ``mode`` says how to read its embedding.

    ``embed_dim`` comes from one forward pass at ``cfg.input_size``; ``num_classes`` is the size of
    its logits.
    """

    def __init__(self, net: nn.Module, mode: str, cfg: ModelCfg, layer: str | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
        self.net, self.mode, self.layer = net, mode, layer
        mean, std = torch.tensor(cfg.mean or IMAGENET_MEAN), torch.tensor(cfg.std or IMAGENET_STD)
        self.register_buffer("scale", (torch.tensor(IMAGENET_STD) / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((torch.tensor(IMAGENET_MEAN) - mean) / std).view(1, 3, 1, 1), persistent=False)
        self._captured: Tensor | None = None
        modules = dict(net.named_modules())
        if layer is not None:
            if layer not in modules or not layer:
                names = [n for n in modules if n][-8:]
                raise DistillError(f"the model has no layer '{layer}'; its last layers are: {', '.join(names)}")
            modules[layer].register_forward_hook(self._keep_output)
        elif mode == "classifier":
            linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
            if not linears:
                raise DistillError("the teacher has no Linear classifier to take the features before: name one with --teacher-layer")
            linears[-1].register_forward_pre_hook(self._keep_input)
        weight = next(net.parameters())
        with torch.no_grad():
            was_training = net.training
            emb, logits = self.eval()(torch.zeros(1, 3, *cfg.input_size, dtype=weight.dtype, device=weight.device))
            net.train(was_training)
        self.embed_dim, self.num_classes = emb.shape[1], logits.shape[1]

    def _keep_output(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._captured = output

    def _keep_input(self, module: nn.Module, args: tuple) -> None:
        self._captured = args[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x * self.scale + self.shift
        if self.mode == "timm" and self.layer is None:
            features = self.net.forward_features(x)
            emb, logits = self.net.forward_head(features, pre_logits=True), self.net.forward_head(features)
        else:
            out = self.net(x)
            emb, logits = out if self.mode == "pair" else (None, out)
            if self.mode == "pair" and self.layer is None:
                return emb, logits
            emb, self._captured = self._captured, None
        return pooled_embedding(emb), logits


def pooled_embedding(output: Tensor) -> Tensor:
    """A layer's output as an L2-normalised embedding: global-average-pooled when it is a feature map."""
    return F.normalize(output.mean(dim=(2, 3)) if output.dim() == 4 else output.flatten(1), dim=1)


def at_layer(model: nn.Module, arch: str, layer: str | None) -> nn.Module:
    """``model``, a distill model of ``arch``, read at ``layer``'s (pooled) output; as it is without one."""
    return model if layer is None else FinishedModel(model, "pair", model_cfg(arch), layer)
