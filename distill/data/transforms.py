"""Augmentation presets (torchvision v2), PIL image -> normalised tensor.

- ``none``: resize only (what evaluation uses).
- ``light``: a small random shift (pad by 1/8 of each side, crop back) and scale jitter
  (random resized crop of 80-100 % of the area, aspect ratio 3/4-4/3), brightness/contrast 0.2.
  Safe for small or orientation-sensitive images (characters, digits, faces).
- ``standard``, re-ID (Luo et al. 2019, "Bag of Tricks"): resize to H x W, pad 10 and crop back,
  random erasing (Zhong et al. 2020) with p=0.5 filled with 0, the ImageNet mean after normalisation.
- ``standard``, retrieval (Song et al. 2016 and later DML work): random resized crop to H x W
  (torchvision's 8-100 % of the area).
- ``flip``: a random horizontal flip on top of the preset (on by default for ``standard``).
- eval: re-ID resizes to H x W; retrieval resizes to H*256/224 x W*256/224 and centre-crops H x W.
All use ImageNet normalisation.
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from distill.errors import DistillError
from distill.models.registry import IMAGENET_MEAN, IMAGENET_STD  # the models' default input normalisation
KINDS = ("reid", "retrieval")
PRESETS = ("none", "light", "standard")


def build_transform(
    image_size: tuple[int, int],
    train: bool,
    kind: str = "reid",
    preset: str = "standard",
    flip: bool | None = None,
) -> Callable[[Image.Image], Tensor]:
    """PIL RGB image -> float tensor ``[3, H, W]`` for ``image_size = (H, W)``.

    ``preset`` and ``flip`` apply to training only (``flip=None``: on for ``standard`` only).
    """
    if kind not in KINDS:
        raise DistillError(f"transform kind must be reid or retrieval, got '{kind}'")
    if preset not in PRESETS:
        raise DistillError(f"augmentation preset must be one of {', '.join(PRESETS)}, got '{preset}'")
    h, w = (int(v) for v in image_size)
    if h < 1 or w < 1:
        raise DistillError(f"image size must be positive, got {h}x{w}")
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if not train:
        if kind == "reid":
            return v2.Compose([v2.Resize((h, w))] + to_tensor)
        return v2.Compose([v2.Resize((round(h * 256 / 224), round(w * 256 / 224))), v2.CenterCrop((h, w))] + to_tensor)
    flips = [v2.RandomHorizontalFlip()] if (preset == "standard" if flip is None else flip) else []
    if preset == "none":
        return v2.Compose([v2.Resize((h, w))] + flips + to_tensor)
    if preset == "light":
        steps = [
            v2.RandomResizedCrop((h, w), scale=(0.8, 1.0), ratio=(0.75 * w / h, 1.333 * w / h)),
            v2.RandomCrop((h, w), padding=(max(1, w // 8), max(1, h // 8))),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ]
        return v2.Compose(steps + flips + to_tensor)
    if kind == "reid":
        steps = [v2.Resize((h, w))] + flips + [v2.RandomCrop((h, w), padding=10)]
        return v2.Compose(steps + to_tensor + [v2.RandomErasing(p=0.5, value=0)])
    return v2.Compose([v2.RandomResizedCrop((h, w))] + flips + to_tensor)
