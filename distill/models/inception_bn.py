"""BN-Inception (Ioffe & Szegedy 2015, "Batch Normalization", Figure 5): DarkRank's teacher.

GoogLeNet with every convolution followed by BatchNorm, 5x5 convolutions replaced by two 3x3, and
stride-2 modules 3c/4e that concatenate a max-pooled pass-through. Channel counts follow the
paper's table (output 1024). Every pool and stride-2 convolution is padded so that a map never
shrinks to zero: the network runs at 32x32 as well as at 224x224; ``EmbeddingNet`` pools globally.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from distill.embedding import EmbeddingNet
from distill.models.registry import ModelCfg, register_model

# (1x1, 3x3 reduce, 3x3, double 3x3 reduce, double 3x3, pool type, pool projection, stride);
# a 1x1 of 0 means no 1x1 branch, a projection of 0 means the pooled input passes through.
INCEPTION_CONFIG: dict[str, tuple[int, int, int, int, int, str, int, int]] = {
    "3a": (64, 64, 64, 64, 96, "avg", 32, 1),
    "3b": (64, 64, 96, 64, 96, "avg", 64, 1),
    "3c": (0, 128, 160, 64, 96, "max", 0, 2),
    "4a": (224, 64, 96, 96, 128, "avg", 128, 1),
    "4b": (192, 96, 128, 96, 128, "avg", 128, 1),
    "4c": (160, 128, 160, 128, 160, "avg", 128, 1),
    "4d": (96, 128, 192, 160, 192, "avg", 128, 1),
    "4e": (0, 128, 192, 192, 256, "max", 0, 2),
    "5a": (352, 192, 320, 160, 224, "avg", 128, 1),
    "5b": (352, 192, 320, 192, 224, "max", 128, 1),
}


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Convolution (no bias: BN has one) -> BatchNorm -> ReLU, padded to keep ``ceil(size / stride)``."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def max_pool(stride: int = 2) -> nn.MaxPool2d:
    return nn.MaxPool2d(3, stride, padding=1)


class Inception(nn.Module):
    """One BN-Inception module: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | pool (-> 1x1), concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, cd3r: int, cd3: int, pool: str, cp: int, stride: int) -> None:
        super().__init__()
        self.branch1 = conv_bn(cin, c1, 1) if c1 else None
        self.branch3 = nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3, stride))
        self.branch_double3 = nn.Sequential(conv_bn(cin, cd3r, 1), conv_bn(cd3r, cd3, 3), conv_bn(cd3, cd3, 3, stride))
        pool_layer = max_pool(stride) if pool == "max" else nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)
        self.branch_pool = nn.Sequential(pool_layer, conv_bn(cin, cp, 1)) if cp else pool_layer
        self.out_channels = c1 + c3 + cd3 + (cp or cin)

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.branch3(x), self.branch_double3(x), self.branch_pool(x)]
        if self.branch1 is not None:
            branches.insert(0, self.branch1(x))
        return torch.cat(branches, dim=1)


class InceptionBN(nn.Module):
    """Stem (7x7/2, pool, 1x1, 3x3, pool) then inception 3a..5b; returns the ``[N, C, h, w]`` map.

    ``width`` scales every channel count (1.0 = the paper's network; output ``1024 * width``).
    """

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return max(1, round(c * width)) if c else 0

        self.stem = nn.Sequential(
            conv_bn(3, ch(64), 7, 2),
            max_pool(),
            conv_bn(ch(64), ch(64), 1),
            conv_bn(ch(64), ch(192), 3),
            max_pool(),
        )
        blocks, cin = [], ch(192)
        for name, (c1, c3r, c3, cd3r, cd3, pool, cp, stride) in INCEPTION_CONFIG.items():
            block = Inception(cin, ch(c1), ch(c3r), ch(c3), ch(cd3r), ch(cd3), pool, ch(cp), stride)
            blocks.append((name, block))
            cin = block.out_channels
        self.blocks = nn.Sequential(OrderedDict(blocks))
        self.out_channels = cin

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))


FEATURE_LAYERS = tuple(f"backbone.blocks.{name}" for name in INCEPTION_CONFIG)


@register_model("inception_bn", "teacher", ModelCfg(input_size=(256, 128), embed_dim=128, feature_layers=FEATURE_LAYERS))
def inception_bn(embed_dim: int, num_classes: int, width: float = 1.0) -> EmbeddingNet:
    """BN-Inception backbone with the L2-normalised embedding and classifier heads."""
    backbone = InceptionBN(width)
    return EmbeddingNet(backbone, backbone.out_channels, embed_dim, num_classes)
