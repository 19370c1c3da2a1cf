"""Network-in-Network with BatchNorm (Lin et al. 2013): DarkRank's student.

The ImageNet NIN: four mlpconv blocks (a kxk convolution followed by two 1x1 convolutions, the
"micro network" of the paper, each conv + BN + ReLU) with 3x3/2 max pooling between them.
Pools and convolutions are padded so that a map never shrinks to zero (32x32 up to 256x128);
``EmbeddingNet`` replaces NIN's global-average-pooled class maps with an embedding head.
"""

from __future__ import annotations

from torch import Tensor, nn

from distill.embedding import EmbeddingNet
from distill.models.registry import ModelCfg, register_model

# (kernel, stride, channels) of each mlpconv block; its two 1x1 convolutions keep the channels.
NIN_CONFIG: tuple[tuple[int, int, int], ...] = ((11, 4, 96), (5, 1, 256), (3, 1, 384), (3, 1, 1024))


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def mlpconv(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    """kxk conv -> 1x1 conv -> 1x1 conv: a small MLP slid over the image (NIN's mlpconv layer)."""
    return nn.Sequential(conv_bn(cin, cout, kernel, stride), conv_bn(cout, cout, 1), conv_bn(cout, cout, 1))


class NINBN(nn.Module):
    """mlpconv blocks with max pooling between them; returns the ``[N, C, h, w]`` map.

    ``width`` scales every channel count; compute falls roughly with ``width ** 2``.
    """

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, (kernel, stride, channels) in enumerate(NIN_CONFIG):
            if i:
                layers.append(nn.MaxPool2d(3, 2, padding=1))
            cout = max(1, round(channels * width))
            layers.append(mlpconv(cin, cout, kernel, stride))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_channels = cin

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


# the mlpconv blocks sit at even indices of ``NINBN.layers`` (max pools between them)
FEATURE_LAYERS = tuple(f"backbone.layers.{2 * i}" for i in range(len(NIN_CONFIG)))


@register_model("nin_bn", "student", ModelCfg(input_size=(256, 128), embed_dim=128, feature_layers=FEATURE_LAYERS))
def nin_bn(embed_dim: int, num_classes: int, width: float = 1.0) -> EmbeddingNet:
    """NIN-BN backbone with the L2-normalised embedding and classifier heads."""
    backbone = NINBN(width)
    return EmbeddingNet(backbone, backbone.out_channels, embed_dim, num_classes)
