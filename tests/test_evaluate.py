"""Evaluation metrics against slow, obviously-right references (Python loops, float64)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from distill import evaluate
from distill.errors import DistillError
from distill.evaluate import pairwise_f1, reid_metrics, retrieval_metrics

METRICS = ["cosine", "euclidean"]


# ----------------------------------------------------------------------------- references


def ref_dist(a: list[float], b: list[float], metric: str) -> float:
    if metric == "cosine":
        dot = sum(x * y for x, y in zip(a, b))
        return 1.0 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    return sum((x - y) ** 2 for x, y in zip(a, b))


def ref_reid(qf, gf, qp, gp, qc, gc, max_rank, metric):
    """torchreid's eval_market1501, one query at a time; ties by gallery index (sorted() is stable)."""
    qf, gf = qf.double().tolist(), gf.double().tolist()
    qp, gp, qc, gc = (t.tolist() for t in (qp, gp, qc, gc))
    aps, firsts = [], []
    for i in range(len(qf)):
        order = sorted(range(len(gf)), key=lambda j: ref_dist(qf[i], gf[j], metric))
        kept = [j for j in order if not (gp[j] == qp[i] and gc[j] == qc[i])]
        good = [gp[j] == qp[i] for j in kept]
        if not any(good):
            continue
        hits, precisions = 0, []
        for r, g in enumerate(good, start=1):
            if g:
                hits += 1
                precisions.append(hits / r)
        aps.append(sum(precisions) / len(precisions))
        firsts.append(good.index(True) + 1)
    cmc = [sum(f <= k for f in firsts) / len(firsts) for k in range(1, max_rank + 1)]
    return {
        "map": sum(aps) / len(aps),
        "cmc": cmc,
        "rank1": sum(f <= 1 for f in firsts) / len(firsts),
        "rank5": sum(f <= 5 for f in firsts) / len(firsts),
        "rank10": sum(f <= 10 for f in firsts) / len(firsts),
        "num_valid_queries": len(firsts),
    }


def ref_recall(emb, labels, ks, metric):
    emb, labels = emb.double().tolist(), labels.tolist()
    out = {}
    for k in ks:
        hits = 0
        for i in range(len(emb)):
            others = sorted((j for j in range(len(emb)) if j != i), key=lambda j: ref_dist(emb[i], emb[j], metric))
            hits += any(labels[j] == labels[i] for j in others[:k])
        out[f"recall@{k}"] = hits / len(emb)
    return out


def ref_pairwise_f1(labels, clusters) -> float:
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(labels)), 2):
        same_class, same_cluster = labels[i] == labels[j], clusters[i] == clusters[j]
        tp += same_class and same_cluster
        fp += same_cluster and not same_class
        fn += same_class and not same_cluster
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


# ----------------------------------------------------------------------------- data


def reid_data(seed: int, ties: bool = False, q: int = 14, g: int = 40, d: int = 6):
    """Random features; gallery pid 0 = distractors; some queries with no usable match."""
    gen = torch.Generator().manual_seed(seed)
    if ties:  # {-1, 1}^4: few distinct vectors, many exact ties, exact arithmetic in float32
        qf = torch.randint(0, 2, (q, 4), generator=gen).float() * 2 - 1
        gf = torch.randint(0, 2, (g, 4), generator=gen).float() * 2 - 1
    else:
        qf, gf = torch.randn(q, d, generator=gen), torch.randn(g, d, generator=gen)
    q_pids = torch.randint(1, 6, (q,), generator=gen)
    g_pids = torch.randint(0, 6, (g,), generator=gen)
    q_cams, g_cams = torch.randint(0, 3, (q,), generator=gen), torch.randint(0, 3, (g,), generator=gen)
    q_pids[0] = 99  # pid absent from the gallery
    q_pids[1], q_cams[1] = 7, 0  # pid present only in the query's own camera
    g_pids[:2], g_cams[:2] = 7, 0
    return qf, gf, q_pids, g_pids, q_cams, g_cams


# ----------------------------------------------------------------------------- re-ID


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_reid_matches_reference(seed, metric, ties):
    data = reid_data(seed, ties)
    got = reid_metrics(*data, max_rank=12, metric=metric, chunk_size=5)
    want = ref_reid(*data, max_rank=12, metric=metric)
    assert_same(got, want)
    assert want["num_valid_queries"] < len(data[0])  # the skipped queries were exercised


@pytest.mark.parametrize("metric", METRICS)
def test_reid_chunk_sizes_identical(metric):
    data = reid_data(5, ties=True, q=17)
    results = [reid_metrics(*data, metric=metric, chunk_size=c) for c in (1, 3, 1000, None)]
    assert all(r == results[0] for r in results[1:])


def test_reid_hand_case():
    """1-D features, Euclidean. Query A at 0 (pid 1, cam 0), query B at 10 (pid 2, cam 1), query C has no match.

    A's gallery order by distance: g0 g1 g2 g3 g4 g5 g6; g1 has A's pid and camera -> removed.
    Kept: g0 (match, rank 1), g2 (distractor), g3 (match, rank 3), ... -> AP_A = (1/1 + 2/3) / 2, first hit 1.
    B's order: g4 (9) g5 (12) g6 (13) ...; g5 has B's pid and camera -> removed.
    Kept: g4 (no), g6 (match, rank 2) -> AP_B = 1/2, first hit 2.
    """
    qf = torch.tensor([[0.0], [10.0], [100.0]])
    q_pids, q_cams = [1, 2, 7], [0, 1, 0]
    gf = torch.tensor([[1.0], [2.0], [3.0], [4.0], [9.0], [12.0], [13.0]])
    g_pids, g_cams = [1, 1, 0, 1, 3, 2, 2], [1, 0, 1, 2, 0, 1, 0]
    got = reid_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=3, metric="euclidean")
    assert got["map"] == pytest.approx(((1 / 1 + 2 / 3) / 2 + 1 / 2) / 2)
    assert got["cmc"] == pytest.approx([1 / 2, 1, 1])
    assert (got["rank1"], got["rank5"], got["rank10"]) == (0.5, 1.0, 1.0)
    assert got["num_valid_queries"] == 2


@pytest.mark.parametrize("metric", METRICS)
def test_reid_ties_broken_by_gallery_index(metric):
    """A match and a non-match at the same distance: the lower gallery index ranks first."""
    qf = torch.tensor([[1.0, 0.0]])
    gf = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # equidistant from the query in both metrics
    match_second = reid_metrics(qf, gf, [1], [2, 1], [0], [1, 1], metric=metric)
    match_first = reid_metrics(qf, gf, [1], [1, 2], [0], [1, 1], metric=metric)
    assert match_second["map"] == pytest.approx(1 / 2) and match_second["rank1"] == 0.0
    assert match_first["map"] == 1.0 and match_first["rank1"] == 1.0


def test_reid_accepts_numpy_and_lists():
    qf, gf, qp, gp, qc, gc = reid_data(1)
    want = reid_metrics(qf, gf, qp, gp, qc, gc)
    got = reid_metrics(qf.numpy(), gf.numpy(), qp.tolist(), gp.tolist(), qc.numpy(), gc.tolist())
    assert got == want


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metric": "hamming"}, "unknown metric 'hamming': use one of cosine, euclidean"),
        ({"q_pids": [1, 2]}, r"got 3 feature rows but 2 query pids"),
        ({"g_camids": [0] * 5}, r"got 4 feature rows but 5 gallery camera ids"),
        ({"q_pids": [1.0, 2.0, 3.0]}, r"query pids must be a 1-D sequence of integers"),
        ({"qf": torch.zeros(0, 2), "q_pids": [], "q_camids": []}, r"query features are empty"),
        ({"gf": torch.zeros(4, 3)}, r"query features have dimension 2 but gallery features 3"),
        ({"qf": torch.zeros(3)}, r"query features must be a 2-D \[N, D\] array, got shape \(3,\)"),
        ({"gf": torch.full((4, 2), float("nan"))}, r"gallery features contain NaN or inf"),
        ({"max_rank": 0}, r"max_rank must be a positive integer, got 0"),
        ({"chunk_size": 0}, r"chunk_size must be a positive integer, got 0"),
        ({"g_pids": [5, 5, 5, 5]}, r"no query has a correct match in the gallery from another camera"),
        ({"g_camids": [0, 1, 2, 3], "q_camids": [0, 1, 2]}, r"no query has a correct match"),
    ],
)
def test_reid_bad_inputs(change, message):
    args = {
        "qf": torch.randn(3, 2),
        "gf": torch.randn(4, 2),
        "q_pids": [1, 2, 3],
        "g_pids": [1, 2, 3, 4],
        "q_camids": [0, 0, 0],
        "g_camids": [1, 1, 1, 1],  # valid otherwise: every query has a match from another camera
    } | change
    with pytest.raises(DistillError, match=message):
        reid_metrics(**args)


# ----------------------------------------------------------------------------- retrieval


def retrieval_data(seed: int, ties: bool = False, n: int = 30):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randint(0, 2, (n, 4), generator=gen).float() * 2 - 1 if ties else torch.randn(n, 5, generator=gen)
    labels = torch.randint(0, 6, (n,), generator=gen)
    labels[-1] = 42  # a class with one sample: never a hit
    return emb, labels


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_recall_matches_reference(seed, metric, ties):
    emb, labels = retrieval_data(seed, ties)
    ks = (1, 2, 4, 8, 29)
    got = retrieval_metrics(emb, labels, ks=ks, metric=metric, chunk_size=4, clustering=False)
    assert_same(got, ref_recall(emb, labels, ks, metric))


@pytest.mark.parametrize("metric", METRICS)
def test_retrieval_chunk_sizes_identical(metric):
    emb, labels = retrieval_data(3, ties=True, n=23)
    results = [retrieval_metrics(emb, labels, metric=metric, chunk_size=c) for c in (1, 3, 1000, None)]
    assert all(r == results[0] for r in results[1:])


def test_recall_hand_case():
    """Points 0, 1, 3, 6 with labels a, b, a, b (Euclidean); nearest others and their labels:
    0: 1(b) 3(a) 6(b) -> first hit 2;  1: 0(a) 3(a) 6(b) -> 3;  3: 1(b) 0(a) 6(b) -> 2;  6: 3(a) 1(b) 0(a) -> 2.
    """
    emb = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    got = retrieval_metrics(emb, [0, 1, 0, 1], ks=(1, 2, 3), metric="euclidean", clustering=False)
    assert got == {"recall@1": 0.0, "recall@2": 3 / 4, "recall@3": 1.0}


def test_recall_ties_broken_by_index():
    """Query 0 has two others at the same distance: the lower index is its nearest neighbour."""
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    first_is_match = retrieval_metrics(emb, [0, 0, 1], ks=(1,), metric="euclidean", clustering=False)
    second_is_match = retrieval_metrics(emb, [0, 1, 0], ks=(1,), metric="euclidean", clustering=False)
    # query 0 hits only in the first case; queries 1 and 2 have query 0 as their nearest (distance 1 vs 2)
    assert first_is_match["recall@1"] == pytest.approx(2 / 3)
    assert second_is_match["recall@1"] == pytest.approx(1 / 3)


def test_retrieval_accepts_numpy_and_lists():
    emb, labels = retrieval_data(4)
    want = retrieval_metrics(emb, labels, use_faiss=False)
    got = retrieval_metrics(emb.numpy(), labels.tolist(), ks=np.array([1, 2, 4, 8]), use_faiss=False)
    assert got == want


@pytest.mark.parametrize("seed", range(3))
def test_pairwise_f1_matches_loop(seed):
    rng = np.random.default_rng(seed)
    labels, clusters = rng.integers(0, 5, 40), rng.integers(0, 7, 40)
    assert pairwise_f1(labels, clusters) == pytest.approx(ref_pairwise_f1(labels.tolist(), clusters.tolist()), abs=1e-12)


def test_pairwise_f1_hand_case():
    """Classes [a a b b], clusters [x x x y]: TP = {01}, FP = {02, 12}, FN = {23} -> P = 1/3, R = 1/2."""
    p, r = 1 / 3, 1 / 2
    assert pairwise_f1([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(2 * p * r / (p + r))
    assert pairwise_f1([0, 1, 2], [0, 1, 2]) == 0.0  # no positive pair at all


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", range(3))
def test_clustering_matches_sklearn_and_loop(seed, metric):
    emb, labels = retrieval_data(seed, n=40)
    got = retrieval_metrics(emb, labels, metric=metric, seed=seed, use_faiss=False)
    x = (F.normalize(emb, dim=1) if metric == "cosine" else emb).numpy()
    y = labels.numpy()
    assignment = KMeans(n_clusters=len(np.unique(y)), n_init=evaluate.KMEANS_N_INIT, random_state=seed).fit_predict(x)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(y, assignment), abs=1e-12)
    assert got["f1"] == pytest.approx(ref_pairwise_f1(y.tolist(), assignment.tolist()), abs=1e-12)
    assert got == retrieval_metrics(emb, labels, metric=metric, seed=seed, use_faiss=False)  # seeded


def test_clustering_perfect_on_separated_classes():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    labels = torch.arange(4).repeat_interleave(5)
    emb = centres[labels] + 0.01 * torch.randn(20, 4, generator=gen)
    got = retrieval_metrics(emb, labels, use_faiss=False)
    assert got == pytest.approx({"recall@1": 1.0, "recall@2": 1.0, "recall@4": 1.0, "recall@8": 1.0, "nmi": 1.0, "f1": 1.0})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ks": (1, 10)}, r"recall@10 needs at least 11 samples, got 6: use smaller ks"),
        ({"ks": ()}, r"ks must be a non-empty list of positive integers"),
        ({"ks": (0, 1)}, r"ks must be a non-empty list of positive integers, got \[0, 1\]"),
        ({"labels": [0, 1]}, r"got 6 feature rows but 2 labels"),
        ({"metric": "dot"}, r"unknown metric 'dot'"),
        ({"emb": torch.zeros(0, 3), "labels": []}, r"embeddings are empty"),
        ({"chunk_size": -1}, r"chunk_size must be a positive integer, got -1"),
    ],
)
def test_retrieval_bad_inputs(kwargs, message):
    args = {"emb": torch.randn(6, 3), "labels": [0, 0, 1, 1, 2, 2], "ks": (1, 2)} | kwargs
    with pytest.raises(DistillError, match=message):
        retrieval_metrics(**args)


@pytest.mark.skipif(evaluate.faiss is not None, reason="faiss is installed")
def test_use_faiss_without_faiss():
    with pytest.raises(DistillError, match="use_faiss=True but faiss is not installed"):
        retrieval_metrics(torch.randn(6, 3), [0, 0, 1, 1, 2, 2], ks=(1,), use_faiss=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    data = reid_data(2, ties=True)
    assert reid_metrics(*(t.cuda() for t in data)) == reid_metrics(*data)
    emb, labels = retrieval_data(2, ties=True)
    assert retrieval_metrics(emb.cuda(), labels.cuda(), use_faiss=False) == retrieval_metrics(emb, labels, use_faiss=False)
