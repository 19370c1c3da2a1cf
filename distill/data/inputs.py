"""Inputs that fit the data: the input size and augmentation preset a data set trains with.

Used when ``--image-size`` / ``--augment`` / ``--flip`` are not given, and printed by the run:

- input size: the published size of a known benchmark (re-ID 256x128, retrieval 224x224; the
  embedded set its rendered 64x32), halved on a CPU so that it trains in minutes; for an
  ImageFolder the median shape of its training images, scaled to about 64x64 pixels on a CPU
  (224x224 on a GPU) but never above that median size (8x8 digits train at 32x32, not 64x64), in
  multiples of 8, at least 32 a side.
- augmentation: ``standard`` for the benchmarks (the protocols their papers use), ``light`` for an
  ImageFolder of unknown content (small shifts and scale/brightness jitter, no flip: a flip turns
  one handwritten character into another), ``none`` for the embedded set (already varied per image,
  and un-augmented training lets the teacher's outputs be cached once).
"""

from __future__ import annotations

import statistics
from typing import Sequence

from PIL import Image

from distill.data.base import Sample

PUBLISHED_SIZES = {
    "synthetic": (64, 32),
    "market1501": (256, 128),
    "cuhk03": (256, 128),
    "cub200": (224, 224),
    "cars196": (224, 224),
    "sop": (224, 224),
}
PRESETS = {"synthetic": "none", "imagefolder": "light", "digits": "light"}
CPU_AREA, GPU_AREA, MIN_SIDE = 64 * 64, 224 * 224, 32


def _round8(value: float) -> int:
    return max(MIN_SIDE, int(round(value / 8)) * 8)


def median_shape(samples: Sequence[Sample], limit: int = 200) -> tuple[float, float]:
    """Median ``(height / width, height * width)`` over (at most ``limit``, evenly spread) images;
    reads headers only."""
    step = max(1, len(samples) // limit)
    ratios, areas = [], []
    for s in samples[::step][:limit]:
        try:
            with Image.open(s.path) as img:
                ratios.append(img.height / img.width)
                areas.append(img.height * img.width)
        except (OSError, Image.DecompressionBombError):
            continue  # unreadable images are reported by the loader's check
    return (statistics.median(ratios), statistics.median(areas)) if ratios else (1.0, float("inf"))


def choose_image_size(dataset: str, samples: Sequence[Sample], gpu: bool) -> tuple[int, int]:
    """``(H, W)`` for ``dataset`` (its loader name) from its published size or its images' shape."""
    if dataset in PUBLISHED_SIZES:
        h, w = PUBLISHED_SIZES[dataset]
        if gpu or dataset == "synthetic":
            return h, w
        return _round8(h / 2), _round8(w / 2)
    aspect, native = median_shape(samples)
    area = min(GPU_AREA if gpu else CPU_AREA, native)
    return _round8((area * aspect) ** 0.5), _round8((area / aspect) ** 0.5)


def choose_augment(dataset: str) -> str:
    """The augmentation preset for ``dataset``: ``standard`` unless :data:`PRESETS` says otherwise."""
    return PRESETS.get(dataset, "standard")
