"""One object per evaluation protocol (torchreid's split): what a data set's test split is scored
by, what makes it scorable, its headline metrics, and the validation score models are chosen by.

- :data:`REID` (Market-1501, CUHK03): each query searched in the gallery with its same-camera
  matches removed; headline rank-1 and mAP.
- :data:`RETRIEVAL` (CUB-200, Cars196, SOP, ...): every test image searches all the others;
  headline Recall@1 and mAP.

The validation score is the same for both (:meth:`Protocol.distractor_map`): held-out training
identities searched among themselves plus training images as distractors.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from distill.data.base import Splits
from distill.data.dataset import ImageDataset, stack_labels
from distill.engine import extract
from distill.errors import DistillError
from distill.evaluate import reid_metrics, retrieval_metrics
from distill.headlines import HEADLINE, NOTE, PARETO_METRIC
from distill.selection import random_ranking_ap

DISTRACTOR_METRIC = "map with training distractors"
Embedder = Callable[[Tensor], Any]  # images -> (embedding, ...)


class Protocol:
    """A test protocol; subclasses give the test metrics and the test split's check. ``data`` below
    is the run's prepared data (``distill.data.prepare.Prepared``): its ``val`` images, the
    un-augmented training set ``train_plain`` and the ``eval_transform``."""

    name: str
    headline: tuple[str, str]  # the two metrics of the report's drop/gain/kept columns
    pareto_metric: str  # the accuracy axis of the report's Pareto front and plot
    note: str | None = None  # said under the report table
    words: tuple[str, str] = ("classes", "class")
    validation_metric = DISTRACTOR_METRIC

    def test_metrics(self, fn: Embedder, splits: Splits, transform: Callable, device: torch.device,
                     clustering: bool = True) -> dict[str, float]:
        raise NotImplementedError

    def check_test(self, splits: Splits, spec: str) -> None:
        """Fail when no query of the test split has a match to score."""
        raise NotImplementedError

    # ------------------------------------------------------------ validation (both protocols)

    def distractor_map(self, fn: Embedder, data: Any, device: torch.device, max_distractors: int = 1000) -> float:
        """mAP of every validation image searching the other validation images plus (up to
        ``max_distractors``, evenly spread) un-augmented training images as distractors; on re-ID data
        with cameras, matches from the query's own camera are removed as in the test protocol
        (:meth:`validation_cameras`).

        What the teacher gate and ``--teacher-layer auto`` compare by. With a handful of held-out
        identities, Recall@1 among them alone is close to a coin toss between two people; the training
        images ask what matters for classes the model never saw: does it keep them apart from the ones
        it was fitted to; and mAP scores the whole ranking, not only its first place.
        """
        return self.distractor_maps(fn, data, device, max_distractors, count=1)[0]

    def distractor_maps(self, fn: Embedder, data: Any, device: torch.device, max_distractors: int = 1000,
                        count: int | None = None, per_query: bool = False) -> list:
        """:meth:`distractor_map` of each of the first ``count`` outputs of ``fn`` (all when None): a
        model's embedding alone (``count=1``, not its logits), or every layer of ``PooledLayers``.
        With ``per_query``, each is the list of every validation query's AP instead of their mean."""
        picks = _distractor_picks(data, max_distractors)
        val = extract(fn, data.val_set, device)
        train = extract(fn, Subset(data.train_plain, picks), device)
        labels, cams = torch.tensor([s.label for s in data.val]), self.validation_cameras(data)
        gallery_labels = torch.cat([labels, torch.full((len(picks),), int(labels.min()) - 1)])  # no query's label
        gallery_cams = torch.cat([cams, torch.full((len(picks),), -1)])
        results = [
            reid_metrics(v, torch.cat([v, t]), labels, gallery_labels, cams, gallery_cams, per_query=per_query)
            for v, t in list(zip(val, train))[:count]
        ]
        return [r["ap"] if per_query else float(r["map"]) for r in results]

    def distractor_chance(self, data: Any, max_distractors: int = 1000) -> float:
        """:meth:`distractor_map` of a random ranking (its expectation): the chance level of the
        validation score, from how many images each validation identity has and the gallery size."""
        labels, cams = torch.tensor([s.label for s in data.val]), self.validation_cameras(data)
        same_id, same_cam = labels[:, None] == labels[None, :], cams[:, None] == cams[None, :]
        removed = (same_id & same_cam).sum(1)  # the query itself and its same-camera matches
        relevant = (same_id & ~same_cam).sum(1)
        gallery = len(data.val) + len(_distractor_picks(data, max_distractors)) - removed
        scored = relevant > 0  # queries without a match are not scored
        return float(random_ranking_ap(relevant[scored], gallery[scored]).mean())

    def validation_cameras(self, data: Any) -> Tensor:
        """The camera of each validation image for :meth:`distractor_maps`: a distinct one per image,
        so only the query itself is removed from its gallery."""
        return torch.arange(len(data.val))

    def validator(self, data: Any, device: torch.device) -> Callable[[nn.Module], list[float]] | None:
        """The ``fit`` hook that scores a model on the validation identities (None when there are none):
        every query's AP by the :meth:`distractor_map` protocol, the evidence ``distill.selection``
        weighs to keep an epoch."""
        return (lambda model: self.distractor_maps(model, data, device, count=1, per_query=True)[0]) if data.val else None


def _distractor_picks(data: Any, max_distractors: int) -> list[int]:
    """Indices of up to ``max_distractors`` training images, evenly spread (so over the training identities)."""
    return torch.linspace(0, len(data.train_plain) - 1, min(max_distractors, len(data.train_plain))).long().unique().tolist()


def _metrics(retrieval: dict, reid: dict) -> dict[str, float]:
    metrics = {k: float(v) for k, v in retrieval.items() if k.startswith("recall@") or k in ("nmi", "f1")}
    return metrics | {"map": float(reid["map"]), "rank1": float(reid["rank1"])}


class ReidProtocol(Protocol):
    name = "reid"
    headline, pareto_metric, note = HEADLINE[name], PARETO_METRIC[name], NOTE[name]
    words = ("identities", "identity")

    def test_metrics(self, fn: Embedder, splits: Splits, transform: Callable, device: torch.device,
                     clustering: bool = True) -> dict[str, float]:
        """mAP and rank-1 of the queries against the gallery (same-camera matches removed); Recall@K
        (and, with ``clustering``, k-means NMI/F1) over query and gallery pooled."""
        qf = extract(fn, ImageDataset(splits.query, transform), device)[0]
        gf = extract(fn, ImageDataset(splits.gallery, transform), device)[0]
        (q_labels, q_cams), (g_labels, g_cams) = stack_labels(splits.query), stack_labels(splits.gallery)
        reid = reid_metrics(qf, gf, q_labels, g_labels, q_cams, g_cams)
        retrieval = retrieval_metrics(torch.cat([qf, gf]), torch.cat([q_labels, g_labels]), clustering=clustering)
        return _metrics(retrieval, reid)

    def validation_cameras(self, data: Any) -> Tensor:
        """The validation images' own cameras when every image has one and some identity was seen by
        two: then validation removes same-camera matches like the test protocol does (a near-duplicate
        frame from the same camera is found by a network that learnt nothing, so a broken student
        would score well above chance); else a distinct one per image."""
        cams = torch.tensor([s.camera for s in data.val])
        seen_by: dict[int, set[int]] = {}
        for s in data.val:
            seen_by.setdefault(s.label, set()).add(s.camera)
        if bool((cams >= 0).all()) and any(len(c) > 1 for c in seen_by.values()):
            return cams
        return super().validation_cameras(data)

    def check_test(self, splits: Splits, spec: str) -> None:
        cameras: dict[int, set[int]] = {}
        for s in splits.gallery:
            cameras.setdefault(s.label, set()).add(s.camera)
        if not any(cameras.get(q.label, set()) - {q.camera} for q in splits.query):
            raise DistillError(
                f"data set '{spec}': no query has an image of the same person from another camera in the gallery, "
                "so mAP and rank-1 cannot be measured: check the query and gallery images"
            )


class RetrievalProtocol(Protocol):
    name = "retrieval"
    headline, pareto_metric, note = HEADLINE[name], PARETO_METRIC[name], NOTE[name]

    def test_metrics(self, fn: Embedder, splits: Splits, transform: Callable, device: torch.device,
                     clustering: bool = True) -> dict[str, float]:
        """Recall@K (and, with ``clustering``, k-means NMI/F1) over all test images; mAP and rank-1
        of every test image searching all the others."""
        qf = extract(fn, ImageDataset(splits.query, transform), device)[0]
        q_labels, _ = stack_labels(splits.query)
        cams = torch.arange(len(q_labels))  # a distinct "camera" per image removes only itself
        reid = reid_metrics(qf, qf, q_labels, q_labels, cams, cams)
        return _metrics(retrieval_metrics(qf, q_labels, clustering=clustering), reid)

    def check_test(self, splits: Splits, spec: str) -> None:
        if not any(n >= 2 for n in Counter(s.label for s in splits.query).values()):
            raise DistillError(
                f"data set '{spec}': no test class has 2 or more images, so no query has a match: "
                "add test images per class"
            )
        if len(splits.query) < 9:
            raise DistillError(f"data set '{spec}': Recall@8 needs at least 9 test images, got {len(splits.query)}")


REID, RETRIEVAL = ReidProtocol(), RetrievalProtocol()
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (REID, RETRIEVAL)}


def protocol(name: str | None) -> Protocol:
    """The protocol called ``name`` (a data set's ``Splits.protocol``); retrieval when None (an old report)."""
    return PROTOCOLS[name or RETRIEVAL.name]


def evaluate_model(fn: Embedder, splits: Splits, transform: Callable, device: torch.device,
                   clustering: bool = True) -> dict[str, float]:
    """The test metrics of ``fn`` (images -> ``(embedding, ...)``) by the data set's protocol;
    ``transform`` is the eval transform."""
    return protocol(splits.protocol).test_metrics(fn, splits, transform, device, clustering)

