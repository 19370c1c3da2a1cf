"""Teacher-output cache: computed once, keyed by teacher, data and transform, robust to corruption."""

from __future__ import annotations

import torch

from distill.data.base import Sample, data_fingerprint
from distill.teachers.cache import cache_key, cached_outputs


def _samples(tmp_path, sizes):
    out = []
    for i, n in enumerate(sizes):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(b"x" * n)
        out.append(Sample(str(p), i))
    return out


def test_computes_once_then_reads(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(3, 4), torch.randn(3, 2)

    (e1, l1), hit1 = cached_outputs("k", tmp_path, compute)
    (e2, l2), hit2 = cached_outputs("k", tmp_path, compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert torch.equal(e1, e2) and torch.equal(l1, l2)


def test_logits_may_be_absent(tmp_path):
    (_, logits), _ = cached_outputs("k", tmp_path, lambda: (torch.zeros(2, 3), None))
    (_, again), hit = cached_outputs("k", tmp_path, lambda: (torch.ones(2, 3), None))
    assert logits is None and again is None and hit


def test_key_changes_with_teacher_data_and_transform(tmp_path):
    samples = _samples(tmp_path, [3, 4])

    def key(teacher, images, transform):  # as the students' training keys it: the images by their fingerprint
        return cache_key(teacher, data_fingerprint(images), transform)

    base = key("t1", samples, "resize")
    assert key("t1", samples, "resize") == base
    assert key("t2", samples, "resize") != base
    assert key("t1", samples, "crop") != base
    assert key("t1", samples[:1], "resize") != base
    (tmp_path / "1.bin").write_bytes(b"y" * 9)  # the data changed on disk
    assert key("t1", samples, "resize") != base


def test_corrupt_cache_file_is_recomputed(tmp_path):
    (tmp_path / "teacher-k.pt").write_bytes(b"not a torch file")
    (emb, _), hit = cached_outputs("k", tmp_path, lambda: (torch.ones(2, 2), None))
    assert not hit and torch.equal(emb, torch.ones(2, 2))
    assert cached_outputs("k", tmp_path, lambda: (torch.zeros(2, 2), None))[1]
