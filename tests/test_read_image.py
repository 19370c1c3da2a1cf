"""read_image turns every PIL mode into the RGB a viewer shows: checked pixel by pixel against a
plain-Python reference (16-bit scaled to 8 bit, transparency composited on white)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from distill.data.dataset import read_image

H, W = 5, 7


def rgb_of(path) -> np.ndarray:
    img = read_image(str(path))
    assert img.mode == "RGB" and img.size == (W, H)
    return np.asarray(img).astype(int)


def on_white(colour: tuple[int, ...], alpha: int) -> tuple[int, ...]:
    return tuple(round(c * alpha / 255 + 255 * (1 - alpha / 255)) for c in colour)


def assert_pixels(got: np.ndarray, expected: list[list[tuple[int, ...]]], tol: int = 0) -> None:
    for y in range(H):
        for x in range(W):
            for ch in range(3):
                assert abs(got[y, x, ch] - expected[y][x][ch]) <= tol, (y, x, ch, got[y, x], expected[y][x])


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I", ".tif")])
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, mode, suffix):
    values = np.random.default_rng(0).integers(0, 65536, size=(H, W))
    values[0, :3] = [0, 32768, 65535]
    img = Image.fromarray(values.astype(np.uint16)) if mode == "I;16" else Image.fromarray(values.astype(np.int32), mode="I")
    img.save(tmp_path / f"x{suffix}")
    with Image.open(tmp_path / f"x{suffix}") as raw:
        assert raw.mode.startswith("I")
    got = rgb_of(tmp_path / f"x{suffix}")
    assert_pixels(got, [[(min(255, int(v / 257 + 0.5)),) * 3 for v in row] for row in values.tolist()])
    assert got.mean() < 200  # a 16-bit image of uniform values is mid-grey on average, not white


def test_greyscale_and_binary(tmp_path):
    grey = np.random.default_rng(1).integers(0, 256, size=(H, W)).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "l.png")
    assert_pixels(rgb_of(tmp_path / "l.png"), [[(v, v, v) for v in row] for row in grey.tolist()])
    bits = grey > 127
    Image.fromarray(grey).convert("L").point(lambda v: 255 if v > 127 else 0).convert("1").save(tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as raw:
        assert raw.mode == "1"
    assert_pixels(rgb_of(tmp_path / "b.png"), [[(255,) * 3 if b else (0,) * 3 for b in row] for row in bits.tolist()])


def test_palette_with_and_without_a_transparent_colour(tmp_path):
    palette = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    index = np.random.default_rng(2).integers(0, 3, size=(H, W)).astype(np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette([c for colour in palette for c in colour])
    img.save(tmp_path / "p.png")
    assert_pixels(rgb_of(tmp_path / "p.png"), [[palette[i] for i in row] for row in index.tolist()])
    img.save(tmp_path / "pt.png", transparency=1)
    with Image.open(tmp_path / "pt.png") as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    expected = [[(255, 255, 255) if i == 1 else palette[i] for i in row] for row in index.tolist()]
    assert_pixels(rgb_of(tmp_path / "pt.png"), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    rng = np.random.default_rng(3)
    channels = 4 if mode == "RGBA" else 2
    data = rng.integers(0, 256, size=(H, W, channels)).astype(np.uint8)
    data[0, 0, -1], data[0, 1, -1] = 0, 255  # fully transparent, fully opaque
    Image.fromarray(data, mode=mode).save(tmp_path / "a.png")
    colour = (lambda p: tuple(p[:3])) if mode == "RGBA" else (lambda p: (p[0],) * 3)
    expected = [[on_white(colour(p), p[-1]) for p in row] for row in data.tolist()]
    got = rgb_of(tmp_path / "a.png")
    assert_pixels(got, expected, tol=1)
    assert tuple(got[0, 0]) == (255, 255, 255)
    assert tuple(got[0, 1]) == colour(data[0, 1].tolist())
