"""ImageDataset's in-memory caches give exactly what reading each file afresh gives: PIL images kept
(``preload``), transformed tensors kept (``fixed_transform``: the eval transform), and
``with_transform`` reusing the decoded images; random augmentation is never frozen into a cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data.base import Sample
from distill.data.dataset import ImageDataset
from distill.data.transforms import build_transform
from distill.errors import DistillError


def samples(tmp_path, n: int = 6) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(40, 24, 3), dtype=np.uint8)).save(path)
        out.append(Sample(str(path), label=i // 2, camera=i % 2))
    return out


EVAL = build_transform((32, 16), train=False, kind="reid")


def items(dataset: ImageDataset) -> list[tuple]:
    return [dataset[i] for i in range(len(dataset))]


def assert_same(got: list[tuple], expected: list[tuple]) -> None:
    assert len(got) == len(expected)
    for (image, label, index), (ref_image, ref_label, ref_index) in zip(got, expected):
        assert torch.equal(image, ref_image) and (label, index) == (ref_label, ref_index)


def test_fixed_transform_keeps_the_tensors_a_fresh_read_gives(tmp_path):
    data = samples(tmp_path)
    expected = items(ImageDataset(data, EVAL, {0: 5, 1: 6, 2: 7}))  # read from disk on every access
    cached = ImageDataset(data, EVAL, {0: 5, 1: 6, 2: 7}, preload=True, fixed_transform=True)
    for s in data:  # nothing is read after construction
        Path(s.path).unlink()
    assert_same(items(cached), expected)
    with pytest.raises(DistillError, match="image not found"):
        ImageDataset(data, EVAL)[0]


def test_with_transform_reuses_the_decoded_images(tmp_path):
    data = samples(tmp_path)
    other = build_transform((16, 8), train=False, kind="reid")
    expected = items(ImageDataset(data, other))
    train = ImageDataset(data, build_transform((32, 16), train=True, kind="reid", preset="standard"), preload=True)
    for s in data:
        Path(s.path).unlink()
    assert_same(items(train.with_transform(other, fixed_transform=True)), expected)
    assert_same(items(train.with_transform(other)), expected)


def test_random_augmentation_is_not_frozen(tmp_path):
    """A random transform stays random per access even with ``fixed_transform`` left off and ``preload`` on."""
    augment = build_transform((32, 16), train=True, kind="reid", preset="standard")
    dataset = ImageDataset(samples(tmp_path, 2), augment, preload=True)
    torch.manual_seed(0)
    draws = [dataset[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_tensors_over_the_cap_fall_back_to_decoded_images(tmp_path, monkeypatch):
    data = samples(tmp_path)
    expected = items(ImageDataset(data, EVAL))
    monkeypatch.setattr(ImageDataset, "MAX_TENSOR_CACHE", 3 * 32 * 16 * 4 * len(data) - 1)  # one byte short
    over = ImageDataset(data, EVAL, preload=True, fixed_transform=True)
    assert over._tensors is None and over._cache is not None
    monkeypatch.setattr(ImageDataset, "MAX_TENSOR_CACHE", 3 * 32 * 16 * 4 * len(data))
    fits = ImageDataset(data, EVAL, preload=True, fixed_transform=True)
    assert fits._tensors is not None
    for s in data:
        Path(s.path).unlink()
    assert_same(items(over), expected)
    assert_same(items(fits), expected)
