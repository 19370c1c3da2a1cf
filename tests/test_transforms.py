"""Transforms: shapes, eval output against a PIL + float64 reference, and the random augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
from distill.errors import DistillError


def random_image(seed: int, size: tuple[int, int] = (37, 71)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def normalise(pixels: np.ndarray) -> np.ndarray:
    """Reference: uint8 H x W x 3 -> float64 3 x H x W, ImageNet-normalised."""
    x = pixels.astype(np.float64) / 255.0
    return ((x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)


@pytest.mark.parametrize("kind", ["reid", "retrieval"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [(64, 32), (40, 40)])
def test_output_shape_and_dtype(kind: str, train: bool, size: tuple[int, int]) -> None:
    out = build_transform(size, train=train, kind=kind)(random_image(0))
    assert out.shape == (3, *size) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reid_eval_is_resize_and_normalise(seed: int) -> None:
    image = random_image(seed)
    out = build_transform((48, 24), train=False, kind="reid")(image).double().numpy()
    reference = normalise(np.asarray(image.resize((24, 48), Image.BILINEAR)))
    np.testing.assert_allclose(out, reference, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_eval_is_resize_then_centre_crop(seed: int) -> None:
    image = random_image(seed, (90, 70))
    h, w = 56, 42
    out = build_transform((h, w), train=False, kind="retrieval")(image).double().numpy()
    rh, rw = round(h * 256 / 224), round(w * 256 / 224)
    resized = np.asarray(image.resize((rw, rh), Image.BILINEAR))
    top, left = int(round((rh - h) / 2)), int(round((rw - w) / 2))
    np.testing.assert_allclose(out, normalise(resized[top : top + h, left : left + w]), atol=1e-5)


def test_train_transforms_are_seeded() -> None:
    for kind in ("reid", "retrieval"):
        tf = build_transform((32, 16), train=True, kind=kind)
        image = random_image(3)
        torch.manual_seed(5)
        a = tf(image)
        torch.manual_seed(5)
        assert torch.equal(a, tf(image))
        assert not all(torch.equal(a, tf(image)) for _ in range(5))


@pytest.mark.parametrize("kind", ["reid", "retrieval"])
def test_train_flips_horizontally(kind: str) -> None:
    """Left half dark, right half bright: both orientations appear over many draws."""
    pixels = np.zeros((64, 32, 3), np.uint8)
    pixels[:, 16:] = 255
    tf = build_transform((64, 32), train=True, kind=kind)
    torch.manual_seed(0)
    bright_right = []
    for _ in range(40):
        out = tf(Image.fromarray(pixels))
        bright_right.append(bool(out[:, :, 16:].mean() > out[:, :, :16].mean()))
    assert 5 < sum(bright_right) < 35


def test_reid_train_random_erasing_about_half() -> None:
    """A constant image never normalises to exactly 0 (nor does the zero padding): exact zeros are erasing."""
    tf = build_transform((32, 16), train=True, kind="reid")
    image = Image.new("RGB", (16, 32), (200, 30, 90))
    torch.manual_seed(1)
    erased = sum(bool((tf(image) == 0).all(0).any()) for _ in range(200))
    assert 70 < erased < 130
    eval_out = build_transform((32, 16), train=False, kind="reid")(image)
    assert not (eval_out == 0).any()


def test_bad_arguments() -> None:
    with pytest.raises(DistillError, match=r"transform kind must be reid or retrieval, got 'faces'"):
        build_transform((32, 16), train=True, kind="faces")
    with pytest.raises(DistillError, match=r"image size must be positive, got 0x16"):
        build_transform((0, 16), train=False, kind="reid")
