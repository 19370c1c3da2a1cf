"""timm and torchvision networks: cut before their classifier with our embedding head (to train),
or whole (a finished classifier used as it is), and timm's own input config. Never downloads."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.embedding import EmbeddingNet
from distill.errors import DistillError

# the first pooling/head node of a torchvision classifier; the node before it gives the feature map
_HEAD_NODES = {"avgpool", "adaptive_avg_pool2d", "mean", "flatten", "dropout", "classifier", "fc", "head", "heads"}


class LibraryBackbone(nn.Module):
    """A timm/torchvision network cut before its pooling and classifier: ``[N, 3, H, W] -> [N, C, h, w]``.

    ``body`` keeps the library's parameter names, so ImageNet state dicts load into it directly;
    ``head_prefixes`` names the library's classifier modules that such files carry and we dropped.
    """

    def __init__(self, body: nn.Module, head_prefixes: tuple[str, ...], output_key: str | None = None) -> None:
        super().__init__()
        self.body = body
        self.head_prefixes = head_prefixes
        self.output_key = output_key

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return out[self.output_key] if self.output_key is not None else out

    @torch.no_grad()
    def feature_dim(self, name: str) -> int:
        """Channels of the feature map, from one forward pass on a 64x64 image (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            out = self(torch.zeros(1, 3, 64, 64))
        except Exception as err:
            raise DistillError(f"'{name}' cannot run on a 64x64 image ({err}); pick a convolutional model") from None
        finally:
            self.train(was_training)
        if not isinstance(out, Tensor) or out.dim() != 4:
            raise DistillError(f"'{name}' gives no [N, C, H, W] feature map; pick a convolutional model")
        return out.shape[1]


def _timm_name(name: str) -> str:
    import timm

    if not name or not timm.is_model(name):
        raise DistillError(f"unknown timm model '{name}' (see timm.list_models())")
    return name


def _torchvision_name(name: str) -> str:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise DistillError(f"unknown torchvision model '{name}' (see torchvision.models.list_models())")
    return name


def timm_model(name: str, embed_dim: int, num_classes: int) -> EmbeddingNet:
    """``timm:NAME``: timm's network without classifier and pooling (never downloads) + embedding head."""
    import timm

    body = timm.create_model(_timm_name(name), pretrained=False, num_classes=0, global_pool="")
    classifier = getattr(body, "pretrained_cfg", {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    backbone = LibraryBackbone(body, tuple(c + "." for c in classifier))
    return EmbeddingNet(backbone, backbone.feature_dim(f"timm:{name}"), embed_dim, num_classes)


def torchvision_model(name: str, embed_dim: int, num_classes: int) -> EmbeddingNet:
    """``torchvision:NAME``: the classification network cut before its pooling (weights=None) + embedding head."""
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    full = torchvision.models.get_model(_torchvision_name(name), weights=None)
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


def _whole_net(kind: str, name: str, num_classes: int | None = None) -> nn.Module:
    classes = {} if num_classes is None else {"num_classes": num_classes}
    if kind == "timm":
        import timm

        return timm.create_model(_timm_name(name), pretrained=False, **classes)
    import torchvision

    return torchvision.models.get_model(_torchvision_name(name), weights=None, **classes)


def library_classifier(kind: str, name: str, state: dict[str, Tensor]) -> nn.Module:
    """The whole ``timm``/``torchvision`` classifier (random init) with as many classes as ``state``'s
    weights of its last Linear layer, ready to load ``state``."""
    model = _whole_net(kind, name)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    key = f"{linears[-1]}.weight" if linears else None
    if key in state and state[key].dim() == 2 and state[key].shape[0] != model.get_submodule(linears[-1]).out_features:
        model = _whole_net(kind, name, state[key].shape[0])
    return model


def timm_cfg(name: str) -> dict:
    """timm's ``pretrained_cfg`` for ``name`` (``input_size``, ``mean``, ``std``...), without building it."""
    import timm

    cfg = timm.get_pretrained_cfg(_timm_name(name))
    return cfg.to_dict() if cfg is not None else {}
