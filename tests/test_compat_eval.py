"""Student-query -> teacher-gallery evaluation against brute-force Python loops."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data.base import Sample
from distill.errors import DistillError
from distill.evaluate import compatibility_metrics, cross_model_recall


def cos_dist(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return -dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def ranked(query: list[float], gallery: list[list[float]], keep: list[int]) -> list[int]:
    """Gallery indices in ``keep`` sorted by cosine distance to ``query``, ties by lower index."""
    return sorted(keep, key=lambda j: (cos_dist(query, gallery[j]), j))


def py_recall(q: torch.Tensor, g: torch.Tensor, labels: list[int], ks: list[int]) -> dict[str, float]:
    q, g, n = q.tolist(), g.tolist(), len(labels)
    hits = {k: 0 for k in ks}
    for i in range(n):
        order = ranked(q[i], g, [j for j in range(n) if j != i])
        first = next((r + 1 for r, j in enumerate(order) if labels[j] == labels[i]), None)
        for k in ks:
            hits[k] += first is not None and first <= k
    return {f"recall@{k}": hits[k] / n for k in ks}


def py_reid(q, g, q_pids, g_pids, q_cams, g_cams) -> tuple[float, float]:
    """mAP and rank-1, Market-1501 style: same pid and same camera removed, queries without a match skipped."""
    q, g = q.tolist(), g.tolist()
    aps, firsts = [], []
    for i in range(len(q)):
        keep = [j for j in range(len(g)) if not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
        order = ranked(q[i], g, keep)
        matches = [r + 1 for r, j in enumerate(order) if g_pids[j] == q_pids[i]]
        if not matches:
            continue
        aps.append(sum((n + 1) / r for n, r in enumerate(matches)) / len(matches))
        firsts.append(matches[0])
    return sum(aps) / len(aps), sum(f == 1 for f in firsts) / len(firsts)


@pytest.mark.parametrize("seed", range(3))
def test_cross_model_recall_against_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (15,), generator=g)
    student, teacher = torch.randn(15, 3, generator=g), torch.randn(15, 3, generator=g)
    teacher[7] = teacher[3]  # duplicated gallery vectors: exact ties, broken by the lower index
    teacher[11] = teacher[2]
    ks = [1, 2, 4, 8]
    got = cross_model_recall(student, teacher, labels, ks, chunk_size=4)
    assert got == pytest.approx(py_recall(student, teacher, labels.tolist(), ks), abs=1e-12)


def test_cross_model_recall_of_one_model_is_retrieval_recall() -> None:
    from distill.evaluate import retrieval_metrics

    emb, labels = torch.randn(20, 4, generator=torch.Generator().manual_seed(5)), torch.arange(5).repeat(4)
    same = retrieval_metrics(emb, labels, clustering=False)
    assert cross_model_recall(emb, emb, labels) == pytest.approx(same)


def write_images(root, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255.0


def linear_model(seed: int, dim: int):
    w = torch.randn(48, dim, generator=torch.Generator().manual_seed(seed))
    return lambda images: (images.flatten(1) @ w, None)


@pytest.mark.parametrize("protocol", ["reid", "retrieval"])
def test_compatibility_metrics_against_loop(tmp_path, protocol: str) -> None:
    paths = write_images(tmp_path, 18, 1)
    pids = [i % 4 for i in range(18)]
    cams = [i % 3 for i in range(18)]
    samples = [Sample(p, pid, cam if protocol == "reid" else -1) for p, pid, cam in zip(paths, pids, cams)]
    query, gallery = (samples[:6], samples[6:]) if protocol == "reid" else (samples, samples)
    data = SimpleNamespace(splits=SimpleNamespace(query=query, gallery=gallery, protocol=protocol), eval_transform=to_tensor)
    student, teacher = linear_model(2, 5), linear_model(3, 5)
    got = compatibility_metrics(student, teacher, data, torch.device("cpu"), ks=(1, 2, 4))

    def embed(fn, items):
        return fn(torch.stack([to_tensor(Image.open(s.path).convert("RGB")) for s in items]))[0]

    if protocol == "reid":
        ref_map, ref_r1 = py_reid(
            embed(student, query), embed(teacher, gallery), pids[:6], pids[6:], cams[:6], cams[6:]
        )
    else:
        ref_map, ref_r1 = py_reid(embed(student, query), embed(teacher, query), pids, pids, list(range(18)), list(range(18)))
    ref = py_recall(embed(student, samples), embed(teacher, samples), pids, [1, 2, 4])
    assert got == pytest.approx({**ref, "map": ref_map, "rank1": ref_r1}, rel=1e-6)


def test_compatibility_metrics_need_one_space(tmp_path) -> None:
    samples = [Sample(p, i % 2) for i, p in enumerate(write_images(tmp_path, 4, 2))]
    data = SimpleNamespace(splits=SimpleNamespace(query=samples, gallery=samples, protocol="retrieval"), eval_transform=to_tensor)
    with pytest.raises(DistillError, match=r"the student embeds in 5 dimensions, the teacher in 6 \(train the student with --embed-dim 6"):
        compatibility_metrics(linear_model(0, 5), linear_model(1, 6), data, torch.device("cpu"), ks=(1,))
    with pytest.raises(DistillError, match="must be the same images in one space"):
        cross_model_recall(torch.ones(4, 3), torch.ones(5, 3), [0, 0, 1, 1])
