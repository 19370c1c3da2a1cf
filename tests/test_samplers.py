"""PKSampler properties on random label sets, and the DataLoader settings rule."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distill.config_load import load_config
from distill.data import samplers
from distill.data.importance import ImportanceBatchSampler
from distill.data.samplers import PKSampler, loader_settings
from distill.errors import DistillError
from distill.training import batch_sampler


def random_labels(seed: int) -> list[int]:
    """20-40 identities with 1-12 images each (some below K), ids not contiguous, order shuffled."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(1000, size=rng.integers(20, 40), replace=False)
    labels = [int(i) for i in ids for _ in range(rng.integers(1, 13))]
    return [labels[j] for j in rng.permutation(len(labels))]


def expected_batches(n: int, ids: int, p: int, k: int, drop_last: bool) -> list[int]:
    """Reference for the documented epoch length: identities per batch."""
    if ids < p:
        return []
    full = max(1, n // (p * k))
    rest = n - full * p * k
    return [p] * full + ([math.ceil(rest / k)] if rest > 0 and not drop_last else [])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("p,k", [(4, 4), (6, 2), (3, 5)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_every_batch_is_p_identities_by_k_images(seed: int, p: int, k: int, drop_last: bool) -> None:
    labels = random_labels(seed)
    by_label = defaultdict(set)
    for i, label in enumerate(labels):
        by_label[label].add(i)
    sampler = PKSampler(labels, p, k, seed=seed, drop_last=drop_last)
    batches = list(sampler)
    sizes = expected_batches(len(labels), len(by_label), p, k, drop_last)
    assert len(batches) == len(sampler) == len(sizes)
    for batch, size in zip(batches, sizes):
        assert all(isinstance(i, int) for i in batch)
        per_id = defaultdict(list)
        for i in batch:
            per_id[labels[i]].append(i)
        assert len(per_id) == size
        for label, chosen in per_id.items():
            assert len(chosen) == k
            assert set(chosen) <= by_label[label]
            if len(by_label[label]) >= k:
                assert len(set(chosen)) == k  # no repeats when the identity has K images
            else:
                assert set(chosen) == by_label[label]  # all of them, the rest repeated


@pytest.mark.parametrize("seed", [0, 1])
def test_images_of_an_identity_cycle_before_repeating(seed: int) -> None:
    """Per identity with n >= K images, each run of floor(n/K)*K draws is distinct (a reshuffled cycle)."""
    labels = random_labels(seed)
    k = 3
    draws = defaultdict(list)
    for batch in PKSampler(labels, p=5, k=k, seed=seed):
        for i in batch:
            draws[labels[i]].append(i)
    counts = Counter(labels)
    checked = 0
    for label, seq in draws.items():
        n = counts[label]
        if n < k:
            continue
        cycle = (n // k) * k
        for start in range(0, len(seq) - cycle + 1, cycle):
            assert len(set(seq[start : start + cycle])) == cycle
            checked += 1
    assert checked > 0


def test_deterministic_per_seed_and_epoch() -> None:
    labels = random_labels(3)
    a, b = PKSampler(labels, 4, 4, seed=7), PKSampler(labels, 4, 4, seed=7)
    assert list(a) == list(b) == list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 == list(b)
    a.set_epoch(0)
    epoch0 = list(a)
    assert epoch1 != epoch0 and len(epoch1) == len(epoch0)
    assert list(PKSampler(labels, 4, 4, seed=8)) != epoch0


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ddp_shards_are_disjoint_and_equal(world_size: int, drop_last: bool) -> None:
    labels = random_labels(4)
    whole = list(PKSampler(labels, 3, 2, seed=1, drop_last=drop_last))
    shards = []
    for rank in range(world_size):
        s = PKSampler(labels, 3, 2, seed=1, drop_last=drop_last, rank=rank, world_size=world_size)
        s.set_epoch(0)
        shards.append(list(s))
        assert len(shards[-1]) == len(s)
    per_rank = len(whole) // world_size if drop_last else math.ceil(len(whole) / world_size)
    assert all(len(shard) == per_rank for shard in shards)
    # rank r takes global batches r, r + W, ...: positions are disjoint and cover the epoch
    padded = (whole * 2)[: per_rank * world_size]
    for rank, shard in enumerate(shards):
        assert shard == padded[rank::world_size]
    if drop_last:
        positions = [{r + world_size * j for j in range(per_rank)} for r in range(world_size)]
        assert set.union(*positions) == set(range(per_rank * world_size))
        assert sum(map(len, positions)) == per_rank * world_size


def test_too_few_identities_and_bad_arguments() -> None:
    sampler = PKSampler([0, 0, 1, 1, 2], p=4, k=2)
    assert len(sampler) == 0 and list(sampler) == []
    with pytest.raises(DistillError, match=r"PK sampling needs p >= 1 identities and k >= 1 images per identity, got p=0, k=2"):
        PKSampler([0, 1], p=0, k=2)
    with pytest.raises(DistillError, match=r"rank 2 is outside 0..1"):
        PKSampler([0, 1], p=1, k=1, rank=2, world_size=2)


def test_works_as_dataloader_batch_sampler() -> None:
    labels = random_labels(5)
    data = TensorDataset(torch.arange(len(labels)), torch.tensor(labels))
    sampler = PKSampler(labels, 4, 3, seed=2)
    loader = DataLoader(data, batch_sampler=sampler, **loader_settings("cpu", 0))
    for (index, label), batch in zip(loader, sampler):
        assert index.tolist() == batch and label.tolist() == [labels[i] for i in batch]


@pytest.mark.parametrize(
    "device,cores,local_world,expected",
    [
        ("cpu", 2, 1, 0),
        ("cpu", 4, 1, 0),
        ("cpu", 16, 1, 4),
        ("cpu", 6, 1, 3),
        ("cuda", 16, 1, 8),
        ("cuda", 16, 4, 3),
        ("cuda", 1, 1, 0),
    ],
)
def test_loader_settings_rule(monkeypatch: pytest.MonkeyPatch, device: str, cores: int, local_world: int, expected: int) -> None:
    monkeypatch.setattr(samplers, "cpu_count", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    settings = loader_settings(device)
    assert settings == {"num_workers": expected, "pin_memory": device == "cuda", "persistent_workers": expected > 0}


def test_loader_settings_explicit_workers() -> None:
    assert loader_settings(torch.device("cpu"), 3) == {"num_workers": 3, "pin_memory": False, "persistent_workers": True}
    with pytest.raises(DistillError, match=r"--workers must be >= 0, got -1"):
        loader_settings("cpu", -1)


def _loop_importance(emb: torch.Tensor, labels: torch.Tensor, margin: float) -> list[float]:
    """Each image's hardest triplet violation, by explicit loops in float64 (0 without a positive or negative)."""
    e = emb.double()
    out = []
    for a in range(len(labels)):
        pos = [float((e[a] - e[p]).pow(2).sum()) for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [float((e[a] - e[n]).pow(2).sum()) for n in range(len(labels)) if labels[n] != labels[a]]
        out.append(max(0.0, margin + max(pos) - min(neg)) if pos and neg else 0.0)
    return out


def test_importance_batches_are_full_unique_and_deterministic() -> None:
    labels = np.repeat(np.arange(10), 7)
    sampler = ImportanceBatchSampler(labels, batch_size=16, seed=1)
    assert len(sampler) == len(PKSampler(labels, p=4, k=4)) == 4
    first = list(sampler)
    assert len(first) == 4 and all(len(b) == 16 == len(set(b)) and 0 <= min(b) and max(b) < 70 for b in first)
    assert list(ImportanceBatchSampler(labels, batch_size=16, seed=1)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    # triplets come first: every batch holds same-identity pairs for the triplet and DarkRank losses
    assert all(len(set(labels[b])) < len(b) for b in first)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_observe_sets_the_hardest_violation_as_importance(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])  # class 2 has no positive in the batch
    emb = torch.randn(8, 5, generator=gen)
    sampler = ImportanceBatchSampler(np.repeat(np.arange(4), 5), batch_size=8, margin=0.3)
    indices = torch.tensor([0, 1, 5, 6, 7, 10, 15, 16])
    sampler.observe(indices, emb, labels)
    expected = torch.tensor(_loop_importance(emb, labels, 0.3), dtype=torch.float64) + sampler.FLOOR
    torch.testing.assert_close(sampler.importance[indices], expected, rtol=1e-5, atol=1e-5)  # float32 distances
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[indices] = False
    assert bool((sampler.importance[untouched] == 1).all())
    torch.testing.assert_close(sampler.table[indices], emb)


def test_important_images_are_drawn_more_often() -> None:
    labels = np.repeat(np.arange(10), 8)
    sampler = ImportanceBatchSampler(labels, batch_size=12, seed=0)
    sampler.importance[:] = sampler.FLOOR
    sampler.importance[labels == 3] = 100.0
    drawn = np.concatenate([b for epoch in range(5) for b in (sampler.set_epoch(epoch), list(sampler))[1]])
    share = np.mean(labels[drawn] == 3)
    assert share > 0.3  # a uniform draw gives 0.1; class 3 supplies every query and its positive


def test_satisfied_triplets_are_dropped_and_random_images_fill_the_batch() -> None:
    labels = np.repeat(np.arange(6), 4)
    sampler = ImportanceBatchSampler(labels, batch_size=9, margin=0.2)
    # identities 10 apart, images of one identity identical: every triplet satisfies the margin
    sampler.observe(torch.arange(24), torch.tensor(labels, dtype=torch.float32).unsqueeze(1) * 10, torch.tensor(labels))
    assert bool((sampler.importance == sampler.FLOOR).all())
    for batch in sampler:
        assert len(batch) == 9 == len(set(batch))


def test_importance_sampler_state_and_bad_input() -> None:
    labels = np.repeat(np.arange(4), 4)
    a = ImportanceBatchSampler(labels, batch_size=8)
    a.observe(torch.arange(8), torch.randn(8, 3), torch.tensor(labels[:8]))
    b = ImportanceBatchSampler(labels, batch_size=8)
    b.load_state_dict(a.state_dict())
    assert list(a) == list(b)
    with pytest.raises(DistillError, match="sampler state covers 16 images, this training set has 12"):
        ImportanceBatchSampler(labels[:12], batch_size=8).load_state_dict(a.state_dict())
    with pytest.raises(DistillError, match="at least 2 identities and batches of at least 3 images, got 1 identities"):
        ImportanceBatchSampler([5, 5, 5], batch_size=3)


def test_the_run_builds_the_configured_sampler():
    labels = np.repeat(np.arange(6), 8).tolist()
    pk = batch_sampler(load_config(None, batch_size=12, images_per_id=4, seed=5), labels)
    assert isinstance(pk, PKSampler) and (pk.p, pk.k, pk.seed) == (3, 4, 5)
    cfg = load_config(None, batch_size=12, sampler="importance", loss_options=["triplet_margin=0.3"])
    importance = batch_sampler(cfg, labels)
    assert isinstance(importance, ImportanceBatchSampler) and (importance.batch_size, importance.margin) == (12, 0.3)
    with pytest.raises(DistillError, match=r"too small for batches of 10 identities x 4 images \(6 identities\): lower --batch-size"):
        batch_sampler(load_config(None, batch_size=40, images_per_id=4), labels)
