"""``ImageDataset``: reads ``Sample`` records into tensors, reporting unreadable images by path."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from distill.data.base import Sample
from distill.errors import DistillError


WHITE = (255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, keeping the image's look.

    16-bit and 32-bit integer greyscale (``I;16*``, ``I``: 16-bit PNGs) is scaled from 0..65535 to
    0..255 (PIL's own conversion clips it, turning most images white). Transparency (``RGBA``,
    ``LA``, ``PA``, a palette with a transparent colour) is composited on white, as a viewer shows it.
    ``L``, ``1``, ``P`` and the colour modes go through PIL's conversion.
    """
    if img.mode.startswith("I"):
        scaled = np.clip(np.round(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# what PIL raises on a file it cannot decode; a header claiming more than twice
# Image.MAX_IMAGE_PIXELS (a decompression bomb) is refused like a corrupt file
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError)


def read_image(path: str) -> Image.Image:
    """Open an image as RGB (``to_rgb``); raise ``DistillError`` naming the file when it is missing or corrupt.

    Only regular files are opened: a FIFO or device named like an image would block forever."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise DistillError(f"corrupt or unreadable image: {path} (not a regular file)")
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except FileNotFoundError:
        raise DistillError(f"image not found: {path}") from None
    except UNREADABLE as err:
        raise DistillError(f"corrupt or unreadable image: {path} ({err})") from None


def check_images(samples: Sequence[Sample], strict: bool = False) -> list[Sample]:
    """Return the samples whose image decodes; warn about (or with ``strict``, fail on) the rest.

    Each image (a regular file; anything else is unreadable) is fully decoded (JPEGs at reduced scale via ``draft``, which is fast but still reads
    every block), so truncated files are caught here rather than in the middle of training.
    """
    good, bad = [], []
    for s in samples:
        if not os.path.isfile(s.path):  # a FIFO named x.png would block the read forever
            bad.append(s.path)
            continue
        try:
            with Image.open(s.path) as img:
                img.draft("RGB", (img.width // 8 or 1, img.height // 8 or 1))
                img.load()
            good.append(s)
        except UNREADABLE:
            bad.append(s.path)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        if strict:
            raise DistillError(f"{len(bad)} unreadable image(s): {shown} (drop --strict to skip them)")
        warnings.warn(f"skipping {len(bad)} unreadable image(s): {shown}", stacklevel=2)
    return good


class ImageDataset(Dataset):
    """Samples -> ``(image [3, H, W] float, class index, sample index)``.

    ``label_map`` maps the data set's own labels to ``0..C-1`` (classifier targets); without it,
    labels are returned as they are. ``preload`` decodes every image once and keeps the PIL images
    in memory, which is what small data sets (the embedded default) want on a CPU; with a
    ``fixed_transform`` (no random augmentation: the eval transform) the transformed tensors are
    kept instead, while they fit in ``MAX_TENSOR_CACHE`` bytes, so every image is decoded and resized
    once per run rather than once per epoch and validation (the same tensors either way).
    """

    MAX_TENSOR_CACHE = 512 * 2**20

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], Tensor],
        label_map: dict[int, int] | None = None,
        preload: bool = False,
        fixed_transform: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.label_map = label_map
        self._cache = [read_image(s.path) for s in self.samples] if preload else None
        self._tensors = self._transformed() if fixed_transform else None

    def _transformed(self) -> list[Tensor] | None:
        """Every preloaded image through the transform, when they fit in ``MAX_TENSOR_CACHE``."""
        if not self._cache:
            return None
        first = self.transform(self._cache[0])
        if first.numel() * first.element_size() * len(self._cache) > self.MAX_TENSOR_CACHE:
            return None
        return [first] + [self.transform(img) for img in self._cache[1:]]

    def with_transform(self, transform: Callable[[Image.Image], Tensor], fixed_transform: bool = False) -> ImageDataset:
        """The same samples and labels through another transform, reusing the decoded images."""
        other = copy.copy(self)
        other.transform = transform
        other._tensors = other._transformed() if fixed_transform else None
        return other

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        s = self.samples[index]
        label = self.label_map[s.label] if self.label_map is not None else s.label
        if self._tensors is not None:
            return self._tensors[index], label, index
        img = self._cache[index] if self._cache is not None else read_image(s.path)
        return self.transform(img), label, index

    @property
    def labels(self) -> list[int]:
        m = self.label_map
        return [m[s.label] if m is not None else s.label for s in self.samples]


def make_label_map(samples: Sequence[Sample]) -> dict[int, int]:
    """Data-set labels -> contiguous class indices ``0..C-1`` in sorted label order."""
    return {label: i for i, label in enumerate(sorted({s.label for s in samples}))}


def stack_labels(samples: Sequence[Sample]) -> tuple[Tensor, Tensor]:
    """``(labels, cameras)`` of a sample list as int64 tensors (for evaluation)."""
    return (
        torch.tensor([s.label for s in samples], dtype=torch.long),
        torch.tensor([s.camera for s in samples], dtype=torch.long),
    )
