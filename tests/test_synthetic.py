"""The embedded default data set: deterministic, identity-disjoint, a valid re-ID split, atomic."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from distill.data import load_dataset
from distill.data import synthetic
from distill.data.synthetic import SyntheticSpec, generate, split

SMALL = dict(train_ids=6, test_ids=4, images_per_id=8, height=32, width=16)


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_generation_is_deterministic_and_seeded(tmp_path):
    a = generate(SyntheticSpec(**SMALL), tmp_path / "a")
    b = generate(SyntheticSpec(**SMALL), tmp_path / "b")
    c = generate(SyntheticSpec(**SMALL, seed=1), tmp_path / "c")
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_split_counts_and_identity_disjointness(tmp_path):
    s = load_dataset(f"synthetic:{tmp_path}", **SMALL)
    assert s.protocol == "reid"
    assert len(s.train) == 6 * 8
    assert len(s.query) + len(s.gallery) == 4 * 8
    train_ids = {x.label for x in s.train}
    test_ids = {x.label for x in s.query} | {x.label for x in s.gallery}
    assert len(train_ids) == 6 and len(test_ids) == 4 and not train_ids & test_ids


def test_queries_are_two_cameras_per_identity_each_with_a_cross_camera_match(tmp_path):
    s = load_dataset(f"synthetic:{tmp_path}", **SMALL)
    per_id = Counter(q.label for q in s.query)
    assert set(per_id.values()) == {2}
    for q in s.query:
        assert sum(1 for o in s.query if o.label == q.label and o.camera == q.camera) == 1
        assert any(g.label == q.label and g.camera != q.camera for g in s.gallery)


def test_images_have_the_requested_size(tmp_path):
    from PIL import Image

    s = load_dataset(f"synthetic:{tmp_path}", **SMALL)
    with Image.open(s.train[0].path) as img:
        assert img.size == (16, 32) and img.mode == "RGB"


def test_reuses_rendered_directory(tmp_path, monkeypatch):
    spec = SyntheticSpec(**SMALL)
    first = generate(spec, tmp_path)
    monkeypatch.setattr(synthetic, "_render", lambda *a, **k: pytest.fail("rendered again"))
    assert generate(spec, tmp_path) == first
    assert len(split(spec, first).train) == 48


def test_interrupted_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic._render

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_render", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate(SyntheticSpec(**SMALL), tmp_path)
    assert list(tmp_path.iterdir()) == []
