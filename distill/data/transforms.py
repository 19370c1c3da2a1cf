"""The usual re-ID and retrieval augmentations (torchvision v2), PIL image -> normalised tensor.

- re-ID train (Luo et al. 2019, "Bag of Tricks"): resize to H x W, flip, pad 10 and crop back to
  H x W, ImageNet normalisation, random erasing (Zhong et al. 2020) with p=0.5, filled with 0,
  which is the ImageNet mean after normalisation.
- retrieval train (Song et al. 2016 and later DML work): random resized crop to H x W, flip.
- eval: re-ID resizes to H x W; retrieval resizes to H*256/224 x W*256/224 and centre-crops H x W.
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from distill.errors import DistillError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("reid", "retrieval")


def build_transform(image_size: tuple[int, int], train: bool, kind: str = "reid") -> Callable[[Image.Image], Tensor]:
    """PIL RGB image -> float tensor ``[3, H, W]`` for ``image_size = (H, W)``."""
    if kind not in KINDS:
        raise DistillError(f"transform kind must be reid or retrieval, got '{kind}'")
    h, w = (int(v) for v in image_size)
    if h < 1 or w < 1:
        raise DistillError(f"image size must be positive, got {h}x{w}")
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if kind == "reid" and train:
        steps = [v2.Resize((h, w)), v2.RandomHorizontalFlip(), v2.RandomCrop((h, w), padding=10)]
        return v2.Compose(steps + to_tensor + [v2.RandomErasing(p=0.5, value=0)])
    if kind == "reid":
        return v2.Compose([v2.Resize((h, w))] + to_tensor)
    if train:
        return v2.Compose([v2.RandomResizedCrop((h, w)), v2.RandomHorizontalFlip()] + to_tensor)
    return v2.Compose([v2.Resize((round(h * 256 / 224), round(w * 256 / 224))), v2.CenterCrop((h, w))] + to_tensor)
