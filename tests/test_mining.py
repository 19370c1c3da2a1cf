"""Triplet masks and Deep Ranking's importance triplet sampler."""

from __future__ import annotations

import pytest
import torch

from distill.data.importance import ImportanceTripletSampler
from distill.errors import DistillError
from distill.losses.metric import n_pair_indices
from distill.losses.mining import dense_triplet_mask, pairwise_sq_dist

SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_pairwise_sq_dist_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    x[1] = x[0]
    ref = torch.tensor([[((x[i] - y[j]) ** 2).sum().item() for j in range(4)] for i in range(6)], dtype=torch.float64)
    torch.testing.assert_close(pairwise_sq_dist(x, y), ref)
    d = pairwise_sq_dist(x)
    assert (d >= 0).all() and d[0, 1] < 1e-12


@pytest.mark.parametrize("seed", SEEDS)
def test_dense_triplet_mask_matches_enumeration(seed):
    t = torch.randint(0, 3, (7, 2), generator=torch.Generator().manual_seed(seed)).double()  # many ties
    d = pairwise_sq_dist(t)
    ref = torch.tensor(
        [[[i != a and j != a and bool(d[a, i] < d[a, j]) for j in range(7)] for i in range(7)] for a in range(7)]
    )
    assert torch.equal(dense_triplet_mask(d), ref)
    assert not dense_triplet_mask(d).diagonal(dim1=1, dim2=2).any()  # i != j follows from the strict <


@pytest.mark.parametrize("seed", SEEDS)
def test_n_pair_indices_are_first_two_of_each_class(seed):
    y = torch.randint(0, 4, (11,), generator=torch.Generator().manual_seed(seed))
    y[-1] = 8
    a, p = n_pair_indices(y)
    ref = [[i for i in range(11) if y[i] == c][:2] for c in sorted(set(y.tolist()))]
    assert [[int(i), int(j)] for i, j in zip(a, p)] == [r for r in ref if len(r) == 2]


# ---------------------------------------------------------------- importance triplet sampler


def reservoir_reference(stream, num_classes, capacity, seed):
    """Algorithm R, one item at a time, drawing the same uniform numbers as the sampler."""
    g = torch.Generator().manual_seed(seed)
    slots = [[-1] * capacity for _ in range(num_classes)]
    seen = [0] * num_classes
    for indices, labels in stream:
        u = torch.rand(len(labels), dtype=torch.float64, generator=g)
        for k, (i, c) in enumerate(zip(indices.tolist(), labels.tolist())):
            seen[c] += 1
            t = seen[c]
            slot = t - 1 if t <= capacity else int(u[k] * t)
            if slot < capacity:
                slots[c][slot] = i
    return torch.tensor(slots), torch.tensor(seen)


@pytest.mark.parametrize("seed", SEEDS)
def test_reservoir_equals_sequential_algorithm_r(seed):
    g = torch.Generator().manual_seed(100 + seed)
    stream = []
    for b in range(6):
        labels = torch.randint(0, 4, (9,), generator=g)  # several items of a class per batch
        stream.append((torch.arange(9 * b, 9 * b + 9), labels))
    sampler = ImportanceTripletSampler(4, capacity=3, generator=torch.Generator().manual_seed(seed))
    for indices, labels in stream:
        sampler.update(indices, labels)
    slots, seen = reservoir_reference(stream, 4, 3, seed)
    assert torch.equal(sampler.slots, slots) and torch.equal(sampler.seen, seen)
    assert len(sampler) == int((slots >= 0).sum())


def test_reservoir_keeps_a_uniform_sample():
    classes, items, capacity = 4000, 10, 3
    sampler = ImportanceTripletSampler(classes, capacity=capacity, generator=torch.Generator().manual_seed(0))
    for pos in range(items):  # each class sees items pos = 0..9 in order
        sampler.update(torch.arange(classes) * items + pos, torch.arange(classes))
    kept = torch.bincount(sampler.slots.view(-1) % items, minlength=items).double() / classes
    assert torch.allclose(kept, torch.full((items,), capacity / items, dtype=torch.float64), atol=0.03)  # 4 sigma
    assert (sampler.slots >= 0).all()


def make_sampler(seed, margin=0.2, temperature=0.5, candidates=32, importance=None):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(20) % 5
    table = torch.nn.functional.normalize(torch.randn(20, 4, generator=g), dim=1)
    sampler = ImportanceTripletSampler(5, capacity=3, margin=margin, temperature=temperature,
                                       num_candidates=candidates, generator=g)
    sampler.update(torch.arange(20), labels, importance)
    return sampler, labels, table


@pytest.mark.parametrize("seed", SEEDS)
def test_sample_gives_valid_margin_violating_triplets(seed):
    sampler, labels, table = make_sampler(seed)
    calls = []

    def embed(idx):
        calls.append(idx)
        return table[idx]

    trip = sampler.sample(64, embed)
    assert len(calls) == 1 and len(torch.unique(calls[0])) == len(calls[0])
    assert 0 < len(trip) <= 64
    a, p, n = trip.T
    buffered = set(sampler.slots[sampler.slots >= 0].tolist())
    assert set(trip.view(-1).tolist()) <= buffered
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    d_ap = ((table[a] - table[p]) ** 2).sum(1)
    d_an = ((table[a] - table[n]) ** 2).sum(1)
    assert (d_ap + 0.2 > d_an).all()


def test_sample_margin_filter_extremes():
    sampler, _, table = make_sampler(0, margin=-10.0)  # every triplet satisfies it -> all filtered out
    assert sampler.sample(50, lambda i: table[i]).shape == (0, 3)
    sampler, _, table = make_sampler(0, margin=10.0)  # none satisfies it -> all kept
    assert sampler.sample(50, lambda i: table[i]).shape == (50, 3)


def test_sample_prefers_hard_positive_and_negative():
    """At a tiny temperature the positive is the farthest buffered one and the negative the nearest
    of the candidates (with 2 classes of 3 items, 400 candidates cover every item)."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(6, 3, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    sampler = ImportanceTripletSampler(2, capacity=3, margin=100.0, temperature=1e-4, num_candidates=400, generator=g)
    sampler.update(torch.arange(6), labels)
    for a, p, n in sampler.sample(100, lambda i: table[i]).tolist():
        d = ((table[a] - table) ** 2).sum(1)
        same = [i for i in range(6) if labels[i] == labels[a] and i != a]
        other = [i for i in range(6) if labels[i] != labels[a]]
        assert p == max(same, key=lambda i: d[i]) and n == min(other, key=lambda i: d[i])


def test_queries_follow_importance():
    importance = torch.tensor([1.0, 3.0, 0.0, 4.0])
    sampler = ImportanceTripletSampler(2, capacity=2, margin=100.0, generator=torch.Generator().manual_seed(0))
    sampler.update(torch.arange(4), torch.tensor([0, 0, 1, 1]), importance)
    trip = sampler.sample(20000, lambda i: torch.randn(len(i), 2))
    freq = torch.bincount(trip[:, 0], minlength=4).double() / len(trip)
    assert freq[2] == 0
    assert torch.allclose(freq, importance.double() / importance.sum(), atol=0.02)


def test_index_streamed_twice_never_pairs_with_itself():
    sampler = ImportanceTripletSampler(2, capacity=3, margin=100.0, generator=torch.Generator().manual_seed(0))
    sampler.update(torch.tensor([5, 5, 6, 7]), torch.tensor([0, 0, 1, 1]))  # class 0 holds index 5 twice
    trip = sampler.sample(200, lambda i: torch.randn(len(i), 2))
    assert (trip[:, 0] != trip[:, 1]).all() and not (trip[:, 0] == 5).any()


def test_sampler_errors_and_state_roundtrip():
    sampler = ImportanceTripletSampler(3, capacity=2)
    with pytest.raises(DistillError, match="stream more data"):
        sampler.sample(4, lambda i: torch.zeros(len(i), 2))
    with pytest.raises(DistillError, match=r"labels must lie in 0..2"):
        sampler.update(torch.arange(2), torch.tensor([0, 3]))
    with pytest.raises(DistillError, match="2 indices but 1 labels"):
        sampler.update(torch.arange(2), torch.tensor([0]))
    with pytest.raises(DistillError, match="capacity >= 2"):
        ImportanceTripletSampler(3, capacity=1)
    sampler.update(torch.arange(4), torch.tensor([0, 0, 1, 2]), torch.zeros(4))
    with pytest.raises(DistillError, match="importance 0"):
        sampler.sample(4, lambda i: torch.zeros(len(i), 2))
    other = ImportanceTripletSampler(3, capacity=2)
    other.load_state_dict(sampler.state_dict())
    assert torch.equal(other.slots, sampler.slots) and torch.equal(other.seen, sampler.seen)
    with pytest.raises(DistillError, match="same settings"):
        ImportanceTripletSampler(4, capacity=2).load_state_dict(sampler.state_dict())
