"""Evaluation metrics: re-ID mAP/CMC (Market-1501 / torchreid convention) and retrieval
Recall@K, NMI and pairwise F1 (the Lifted Structure protocol, Oh Song et al. 2016).

Rankings are exact (torch, float32, CPU or CUDA) and computed a block of ``chunk_size`` queries
at a time, so a 60k-image test set never holds an N x N matrix. Ties in distance are broken by
gallery index (lower index ranks first, as a stable sort does), so results are deterministic.
``faiss``, when installed, runs the k-means behind NMI/F1 (the slow part on large sets).

Which metrics a data set's test split is scored with is its protocol's (``distill.protocols``).

Compatibility (student-query -> teacher-gallery): the same protocols with the queries embedded by
one model and the gallery by another, i.e. a student that replaces the teacher for queries while
the gallery stays indexed by the teacher (no re-indexing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import pair_confusion_matrix
from torch import Tensor

from distill.data.dataset import ImageDataset, stack_labels
from distill.engine import extract
from distill.errors import DistillError

try:
    import faiss
except ImportError:
    faiss = None

METRICS = ("cosine", "euclidean")
BLOCK_ELEMENTS = 1 << 20  # distances per block when chunk_size is None (1M: a few MB per temporary)
KMEANS_N_INIT = 1  # scikit-learn's default for k-means++ ("auto"); fixed so results do not depend on the version


def _features(x: Any, name: str) -> Tensor:
    """A finite float32 ``[N, D]`` tensor (torch tensors keep their device)."""
    x = torch.as_tensor(x).detach()
    if x.dim() != 2:
        raise DistillError(f"{name} must be a 2-D [N, D] array, got shape {tuple(x.shape)}")
    if len(x) == 0:
        raise DistillError(f"{name} are empty: evaluation needs at least one sample")
    x = x.float()
    if not torch.isfinite(x).all():
        raise DistillError(f"{name} contain NaN or inf: the model diverged or the checkpoint is damaged")
    return x


def _labels(x: Any, n: int, name: str, device: torch.device) -> Tensor:
    """A 1-D int64 tensor of length ``n`` on ``device``."""
    x = torch.as_tensor(x, device=device)
    if x.dim() != 1 or x.dtype.is_floating_point or x.dtype.is_complex:
        raise DistillError(f"{name} must be a 1-D sequence of integers, got {x.dtype} of shape {tuple(x.shape)}")
    if len(x) != n:
        raise DistillError(f"got {n} feature rows but {len(x)} {name}: they must have one entry per image")
    return x.long()


def _prepare(x: Tensor, metric: str) -> Tensor:
    if metric not in METRICS:
        raise DistillError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    return F.normalize(x, dim=1) if metric == "cosine" else x


def _scores(q: Tensor, g: Tensor, g_sq: Tensor | None) -> Tensor:
    """``[c, G]`` ranking scores, ascending = nearer: -cosine similarity (inputs normalised), or
    squared Euclidean distance minus the per-query constant ``||q||^2`` (same order per row)."""
    return -(q @ g.T) if g_sq is None else g_sq - 2 * (q @ g.T)


def _is_positive_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool) and x >= 1


def _chunk_rows(chunk_size: int | None, n_gallery: int) -> int:
    if chunk_size is None:
        return max(1, BLOCK_ELEMENTS // n_gallery)
    if not _is_positive_int(chunk_size):
        raise DistillError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def reid_metrics(
    qf: Tensor,
    gf: Tensor,
    q_pids: Sequence[int] | Tensor,
    g_pids: Sequence[int] | Tensor,
    q_camids: Sequence[int] | Tensor,
    g_camids: Sequence[int] | Tensor,
    max_rank: int = 50,
    metric: str = "cosine",
    chunk_size: int | None = None,
    per_query: bool = False,
) -> dict[str, Any]:
    """Re-ID mAP and CMC with the Market-1501 / torchreid protocol.

    For each query the gallery is ranked by distance (ties: lower gallery index first) and the
    images with the query's pid *and* camera are removed. Queries with no remaining match are
    skipped. AP = mean over the correct matches of the precision at their rank; CMC(k) = fraction
    of queries whose first correct match is within the top k. Junk images (pid -1) must already be
    dropped by the loader; distractors (pid 0) are ordinary non-matching gallery images.

    Returns ``map``, ``cmc`` (``max_rank`` floats, CMC(1..max_rank)), ``rank1``, ``rank5``,
    ``rank10`` and ``num_valid_queries``; with ``per_query`` also ``ap``, the AP of each query that
    has a match, in query order (their mean is ``map``).
    """
    qf, gf = _features(qf, "query features"), _features(gf, "gallery features")
    if qf.shape[1] != gf.shape[1]:
        raise DistillError(f"query features have dimension {qf.shape[1]} but gallery features {gf.shape[1]}")
    gf = gf.to(qf.device)
    q_pids = _labels(q_pids, len(qf), "query pids", qf.device)
    g_pids = _labels(g_pids, len(gf), "gallery pids", qf.device)
    q_cams = _labels(q_camids, len(qf), "query camera ids", qf.device)
    g_cams = _labels(g_camids, len(gf), "gallery camera ids", qf.device)
    if not _is_positive_int(max_rank):
        raise DistillError(f"max_rank must be a positive integer, got {max_rank!r}")
    qf, gf = _prepare(qf, metric), _prepare(gf, metric)
    g_sq = (gf * gf).sum(1) if metric == "euclidean" else None
    ap, first = _ap_and_first_match(qf, gf, g_sq, q_pids, g_pids, q_cams, g_cams, _chunk_rows(chunk_size, len(gf)))
    valid = first <= len(gf)
    ap, first = ap[valid], first[valid]
    if len(first) == 0:
        raise DistillError(
            "no query has a correct match in the gallery from another camera: check that the query and "
            "gallery pids and camera ids come from the same data set"
        )
    cmc = (first[:, None] <= torch.arange(1, max_rank + 1, device=first.device)).double().mean(0)
    return {
        "map": ap.mean().item(),
        "cmc": cmc.tolist(),
        **{f"rank{k}": (first <= k).double().mean().item() for k in (1, 5, 10)},
        "num_valid_queries": len(first),
    } | ({"ap": ap.tolist()} if per_query else {})


def _ap_and_first_match(
    qf: Tensor, gf: Tensor, g_sq: Tensor | None, q_pids: Tensor, g_pids: Tensor, q_cams: Tensor, g_cams: Tensor, step: int,
) -> tuple[Tensor, Tensor]:
    """Per query (``step`` queries at a time), its AP and the rank of its first correct match (G + 1:
    none) in the gallery ranked by distance, same-pid same-camera images removed."""
    # written into preallocated outputs: no small tensor outlives a block (keeps the allocator's heap compact)
    ap = torch.zeros(len(qf), dtype=torch.float64, device=qf.device)
    first = torch.zeros(len(qf), dtype=torch.long, device=qf.device)  # rank of the first match; G + 1 = none
    for start in range(0, len(qf), step):
        q = slice(start, start + step)
        order = _scores(qf[q], gf, g_sq).sort(dim=1, stable=True).indices
        same_pid = g_pids[order] == q_pids[q, None]
        keep = ~(same_pid & (g_cams[order] == q_cams[q, None]))
        match = same_pid & keep
        rank = keep.cumsum(1)  # 1-based rank among the kept gallery images
        hits = match.cumsum(1)
        precision = torch.where(match, hits.double() / rank, 0.0)
        ap[q] = precision.sum(1) / hits[:, -1].clamp(min=1)
        first[q] = torch.where(match, rank, len(gf) + 1).amin(1)
    return ap, first


def _first_hit_ranks(emb: Tensor, labels: Tensor, step: int, g_sq: Tensor | None, gallery: Tensor | None = None) -> Tensor:
    """1-based rank of each sample's nearest same-label other sample (ties: lower index first);
    ``N`` (never within any K <= N-1) when the sample's class has no other sample. ``gallery``
    (default ``emb``) holds the same samples embedded by another model; ``g_sq`` belongs to it.

    The rank of the item at (score m, index j) in a stable ascending sort is
    ``#{score < m} + #{score == m, index < j}``: no sort, no top-k, only a few passes over the block.
    """
    n = len(emb)
    gallery = emb if gallery is None else gallery
    idx = torch.arange(n, device=emb.device)
    ranks = torch.empty(n, dtype=torch.long, device=emb.device)
    for start in range(0, n, step):
        rows = idx[start : start + step]
        score = _scores(emb[rows], gallery, g_sq)
        score[rows - start, rows] = torch.inf  # a sample never retrieves itself
        same = labels[rows, None] == labels[None]
        same[rows - start, rows] = False
        best = torch.where(same, score, torch.inf).amin(1, keepdim=True)
        j = torch.where(same & (score == best), idx, n).amin(1, keepdim=True)
        rank = (score < best).sum(1) + ((score == best) & (idx < j)).sum(1) + 1
        ranks[rows] = torch.where(same.any(1), rank, n)
    return ranks


def _kmeans(x: np.ndarray, k: int, seed: int, use_faiss: bool) -> np.ndarray:
    """Cluster index of each row: faiss k-means if asked, else scikit-learn (k-means++, fixed n_init)."""
    if use_faiss:
        x = np.ascontiguousarray(x)
        km = faiss.Kmeans(x.shape[1], k, niter=25, nredo=KMEANS_N_INIT, seed=seed)
        km.train(x)
        return km.index.search(x, 1)[1][:, 0]
    return KMeans(n_clusters=k, n_init=KMEANS_N_INIT, random_state=seed).fit_predict(x)


def pairwise_f1(labels: Any, clusters: Any) -> float:
    """Pairwise clustering F1 (Lifted Structure paper, Manning et al. IR book, sec. 16.3).

    Over all unordered pairs: TP = same class and same cluster, FP = same cluster only,
    FN = same class only; F1 = 2PR / (P + R) = 2 TP / (2 TP + FP + FN). Counted from the
    (sparse) contingency table by scikit-learn, never pair by pair. 0 when there are no positive pairs.
    """
    (_, fp), (fn, tp) = pair_confusion_matrix(np.asarray(labels), np.asarray(clusters))  # ordered pairs: x2 each
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def retrieval_metrics(
    emb: Tensor,
    labels: Sequence[int] | Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: str = "cosine",
    chunk_size: int | None = None,
    seed: int = 0,
    clustering: bool = True,
    use_faiss: bool | None = None,
) -> dict[str, float]:
    """Retrieval Recall@K and clustering NMI / F1 (the CUB-200 / Cars196 / SOP protocol).

    Every sample queries all the others; Recall@K is the fraction of samples with at least one
    same-label sample among their K nearest others (ties: lower index first). A sample whose class
    has no other sample counts as a miss. With ``clustering``, k-means (as many clusters as classes,
    on the L2-normalised embeddings for the cosine metric, seeded) gives ``nmi`` (scikit-learn
    normalized_mutual_info_score) and ``f1`` (:func:`pairwise_f1`). ``use_faiss`` None = use
    faiss for k-means when installed.
    """
    emb = _features(emb, "embeddings")
    labels = _labels(labels, len(emb), "labels", emb.device)
    n = len(emb)
    ks = list(ks)
    if not ks or not all(_is_positive_int(k) for k in ks):
        raise DistillError(f"ks must be a non-empty list of positive integers, got {ks!r}")
    if max(ks) > n - 1:
        raise DistillError(f"recall@{max(ks)} needs at least {max(ks) + 1} samples, got {n}: use smaller ks")
    if use_faiss and faiss is None:
        raise DistillError("use_faiss=True but faiss is not installed: install faiss-cpu or faiss-gpu, or leave use_faiss unset")
    emb = _prepare(emb, metric)
    g_sq = (emb * emb).sum(1) if metric == "euclidean" else None

    first = _first_hit_ranks(emb, labels, _chunk_rows(chunk_size, n), g_sq)
    out = {f"recall@{int(k)}": (first <= k).double().mean().item() for k in ks}
    if clustering:
        y = labels.cpu().numpy()
        assignment = _kmeans(emb.cpu().numpy(), len(np.unique(y)), seed, faiss is not None if use_faiss is None else use_faiss)
        out["nmi"] = float(normalized_mutual_info_score(y, assignment))
        out["f1"] = pairwise_f1(y, assignment)
    return out


def cross_model_recall(
    query_emb: Tensor,
    gallery_emb: Tensor,
    labels: Sequence[int] | Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: str = "cosine",
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@K with queries and gallery from two models: row i of both is the same image; each
    query (e.g. the student's embedding) searches the gallery embeddings (e.g. the teacher's) of
    all *other* images, ties broken by lower index as in :func:`retrieval_metrics`."""
    query_emb, gallery_emb = _features(query_emb, "query embeddings"), _features(gallery_emb, "gallery embeddings")
    if query_emb.shape != gallery_emb.shape:
        raise DistillError(
            f"query and gallery embeddings must be the same images in one space, [N, D] each; got "
            f"{tuple(query_emb.shape)} and {tuple(gallery_emb.shape)} (the student needs the teacher's embedding size)"
        )
    gallery_emb = gallery_emb.to(query_emb.device)
    labels = _labels(labels, len(query_emb), "labels", query_emb.device)
    ks = list(ks)
    if not ks or not all(_is_positive_int(k) for k in ks):
        raise DistillError(f"ks must be a non-empty list of positive integers, got {ks!r}")
    if max(ks) > len(query_emb) - 1:
        raise DistillError(f"recall@{max(ks)} needs at least {max(ks) + 1} samples, got {len(query_emb)}: use smaller ks")
    q, g = _prepare(query_emb, metric), _prepare(gallery_emb, metric)
    g_sq = (g * g).sum(1) if metric == "euclidean" else None
    first = _first_hit_ranks(q, labels, _chunk_rows(chunk_size, len(g)), g_sq, gallery=g)
    return {f"recall@{int(k)}": (first <= k).double().mean().item() for k in ks}


def compatibility_metrics(
    student_fn: Callable[[Tensor], Any],
    teacher_fn: Callable[[Tensor], Any],
    data: Any,
    device: torch.device,
    ks: Sequence[int] = (1, 2, 4, 8),
    metric: str = "cosine",
) -> dict[str, float]:
    """Student-query -> teacher-gallery metrics on the test split of ``data`` (the run's
    ``Prepared``: ``splits`` and ``eval_transform``); ``*_fn`` return ``(embedding, ...)``.

    Re-ID: the student embeds the query list, the teacher the gallery (mAP, rank-1 with the usual
    same-camera filter); Recall@K over query + gallery images, each student embedding searched
    against the teacher's embeddings of the other images. Retrieval: every test image's student
    embedding searched against the teacher's embeddings of all the others (Recall@K, and mAP /
    rank-1 with the image itself removed). No NMI/F1: clustering needs one space per run.
    Returns ``recall@K``, ``map`` and ``rank1``, like a model's test metrics (``distill.protocols``).
    """
    splits = data.splits

    def embed(fn: Callable[[Tensor], Any], samples: Sequence[Any]) -> Tensor:
        return extract(fn, ImageDataset(samples, data.eval_transform), device)[0]

    q_labels, q_cams = stack_labels(splits.query)
    s_query, t_query = embed(student_fn, splits.query), embed(teacher_fn, splits.query)
    if s_query.shape[1] != t_query.shape[1]:
        raise DistillError(
            f"student-query -> teacher-gallery search needs one embedding space: the student embeds in "
            f"{s_query.shape[1]} dimensions, the teacher in {t_query.shape[1]} (train the student with "
            f"--embed-dim {t_query.shape[1]} and a compat term, e.g. --distill kd=3,compat=1)"
        )
    if splits.protocol == "reid":
        s_gallery, t_gallery = embed(student_fn, splits.gallery), embed(teacher_fn, splits.gallery)
        g_labels, g_cams = stack_labels(splits.gallery)
        reid = reid_metrics(s_query, t_gallery, q_labels, g_labels, q_cams, g_cams, metric=metric)
        recall = cross_model_recall(
            torch.cat([s_query, s_gallery]), torch.cat([t_query, t_gallery]), torch.cat([q_labels, g_labels]), ks, metric
        )
    else:
        cams = torch.arange(len(q_labels))  # a distinct "camera" per image removes only the image itself
        reid = reid_metrics(s_query, t_query, q_labels, q_labels, cams, cams, metric=metric)
        recall = cross_model_recall(s_query, t_query, q_labels, ks, metric)
    return {**recall, "map": float(reid["map"]), "rank1": float(reid["rank1"])}

