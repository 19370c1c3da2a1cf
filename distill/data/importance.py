"""Deep Ranking's online importance sampling (Wang et al. 2014, Sec. 5): batches filled with the
triplets that are hardest now, learnt from the embeddings the engine feeds back after each step.

``ImportanceTripletSampler`` keeps per-class reservoirs and draws triplets from them;
``ImportanceBatchSampler`` is the DataLoader batch sampler built on it (``--sampler importance``).
Distances are squared Euclidean, the distance of Deep Ranking's triplet loss.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from distill.errors import DistillError


class ImportanceTripletSampler:
    """Deep Ranking's online triplet sampling (Wang et al. 2014, Sec. 5), for integer class labels.

    The training set is streamed through ``update``; each class keeps a reservoir buffer of
    ``capacity`` items (Algorithm R: the ``t``-th item of a class takes a uniformly random slot with
    probability ``capacity / t``), so memory stays ``num_classes x capacity`` whatever the data set
    size. ``sample`` then draws queries in proportion to their importance score, a positive from the
    query's buffer preferring far (hard) ones, ``p ~ softmax(D_qp / temperature)``, a negative from
    ``num_candidates`` random items of other buffers preferring near ones, ``softmax(-D_qn /
    temperature)``, and drops triplets that already satisfy the margin, ``D_qp + margin <= D_qn``.
    Distances are squared Euclidean between embeddings.

    Use in a training loop::

        sampler = ImportanceTripletSampler(num_classes, capacity=16, margin=0.2)
        for images, labels, indices in loader:            # stream the data set
            sampler.update(indices, labels, importance)   # importance: e.g. last loss, or None (= 1)
        triplets = sampler.sample(256, embed=lambda idx: table[idx])  # [T, 3] data set indices
        loss = triplet_loss(*model_embed(triplets.T))      # (anchor, positive, negative)

    ``embed`` maps a 1-D tensor of data set indices to their current embeddings ``[len, D]`` (a cached
    table, or the model run on those images); it is called once per ``sample`` on the unique indices.
    """

    def __init__(
        self,
        num_classes: int,
        capacity: int = 16,
        margin: float = 0.2,
        temperature: float = 0.5,
        num_candidates: int = 32,
        generator: torch.Generator | None = None,
    ) -> None:
        if num_classes < 2 or capacity < 2 or num_candidates < 1 or temperature <= 0:
            raise DistillError(
                "ImportanceTripletSampler needs num_classes >= 2, capacity >= 2, num_candidates >= 1 "
                f"and temperature > 0, got {num_classes}, {capacity}, {num_candidates}, {temperature}"
            )
        self.num_classes = num_classes
        self.capacity = capacity
        self.margin = margin
        self.temperature = temperature
        self.num_candidates = num_candidates
        self.generator = generator
        self.slots = torch.full((num_classes, capacity), -1, dtype=torch.long)
        self.importance = torch.zeros(num_classes, capacity, dtype=torch.float64)
        self.seen = torch.zeros(num_classes, dtype=torch.long)

    def __len__(self) -> int:
        return int((self.slots >= 0).sum())

    def update(self, indices: Tensor, labels: Tensor, importance: Tensor | None = None) -> None:
        """Stream a batch of data set ``indices`` with class ``labels`` (and importance scores, default 1)
        into the per-class reservoirs; the result equals feeding the items one by one in batch order."""
        indices, labels = indices.reshape(-1).long().cpu(), labels.reshape(-1).long().cpu()
        if len(indices) != len(labels):
            raise DistillError(f"update got {len(indices)} indices but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DistillError(f"labels must lie in 0..{self.num_classes - 1}, got {labels.min()}..{labels.max()}")
        importance = (
            torch.ones(len(indices), dtype=torch.float64)
            if importance is None
            else importance.detach().reshape(-1).double().cpu()
        )
        if len(importance) != len(indices) or not bool((importance >= 0).all()):
            raise DistillError("importance must hold one non-negative score per index")
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        pos = torch.arange(len(labels))
        starts = torch.ones_like(sorted_labels, dtype=torch.bool)
        starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
        rank = torch.empty_like(labels)
        rank[order] = pos - torch.cummax(torch.where(starts, pos, 0), 0).values
        t = self.seen[labels] + rank + 1  # 1-based count of this item within its class stream
        u = torch.rand(len(labels), dtype=torch.float64, generator=self.generator)
        slot = torch.where(t <= self.capacity, t - 1, (u * t).long())
        keep = slot < self.capacity
        key = labels * self.capacity + slot
        last = torch.full((self.num_classes * self.capacity,), -1, dtype=torch.long)
        last.scatter_reduce_(0, key[keep], pos[keep], reduce="amax")  # later items overwrite earlier ones
        win = last[last >= 0]
        self.slots.view(-1)[key[win]] = indices[win]
        self.importance.view(-1)[key[win]] = importance[win]
        self.seen += torch.bincount(labels, minlength=self.num_classes)

    def sample(self, n: int, embed: Callable[[Tensor], Tensor]) -> Tensor:
        """Draw ``n`` queries and return the ``[T, 3]`` (anchor, positive, negative) data set indices of
        those whose triplet still violates the margin (``T <= n``)."""
        valid = self.slots >= 0
        sizes = valid.sum(1)
        if int((sizes >= 2).sum()) < 1 or int((sizes >= 1).sum()) < 2:
            raise DistillError(
                "the triplet sampler needs a class with two buffered items and another class with one; "
                "stream more data through update() first"
            )
        flat = valid.view(-1).nonzero().squeeze(1)
        pool_idx, pool_lab = self.slots.view(-1)[flat], flat // self.capacity
        weight = self.importance.view(-1)[flat] * (sizes[pool_lab] >= 2)
        if float(weight.sum()) <= 0:
            raise DistillError("every query candidate has importance 0; give some items a positive importance")
        q = torch.multinomial(weight, n, replacement=True, generator=self.generator)
        q_idx, q_lab = pool_idx[q], pool_lab[q]
        pos_idx = self.slots[q_lab]  # [n, capacity]
        pos_ok = (pos_idx >= 0) & (pos_idx != q_idx.unsqueeze(1))
        cand = torch.randint(len(flat), (n, self.num_candidates), generator=self.generator)
        neg_idx, neg_ok = pool_idx[cand], pool_lab[cand] != q_lab.unsqueeze(1)
        wanted = torch.cat([q_idx, pos_idx.clamp_min(0).view(-1), neg_idx.view(-1)])
        uniq, inv = torch.unique(wanted, return_inverse=True)
        emb = embed(uniq).detach().float().cpu()
        e_q = emb[inv[:n]].unsqueeze(1)
        d_ap = (e_q - emb[inv[n : n + pos_idx.numel()]].view(n, self.capacity, -1)).pow(2).sum(-1)
        d_an = (e_q - emb[inv[n + pos_idx.numel() :]].view(n, self.num_candidates, -1)).pow(2).sum(-1)
        # a row can lack a positive (an index streamed twice fills two slots) or a negative; such rows
        # get uniform logits to keep multinomial defined and are dropped below
        has_pos, has_neg = pos_ok.any(1), neg_ok.any(1)
        p_logits = (d_ap / self.temperature).masked_fill(~pos_ok, float("-inf"))
        n_logits = (-d_an / self.temperature).masked_fill(~neg_ok, float("-inf"))
        p_logits[~has_pos] = 0.0
        n_logits[~has_neg] = 0.0
        p = torch.multinomial(p_logits.softmax(1), 1, generator=self.generator).squeeze(1)
        m = torch.multinomial(n_logits.softmax(1), 1, generator=self.generator).squeeze(1)
        rows = torch.arange(n)
        keep = has_pos & has_neg & (d_ap[rows, p] + self.margin > d_an[rows, m])
        return torch.stack([q_idx, pos_idx[rows, p], neg_idx[rows, m]], dim=1)[keep]

    def state_dict(self) -> dict[str, Tensor]:
        """Buffers and counts, for checkpoints (resume continues the same stream statistics)."""
        return {"slots": self.slots.clone(), "importance": self.importance.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["slots"].shape != self.slots.shape:
            raise DistillError(
                f"sampler state has buffers {tuple(state['slots'].shape)}, expected {tuple(self.slots.shape)} "
                "(num_classes x capacity); build the sampler with the same settings"
            )
        self.slots, self.importance, self.seen = (state[k].clone() for k in ("slots", "importance", "seen"))


class ImportanceBatchSampler(Sampler[list[int]]):
    """Batches of hard triplets by Deep Ranking's online importance sampling (Wang et al. 2014, Sec. 5).

    Each epoch streams the shuffled training set through a fresh ``ImportanceTripletSampler``
    (per-class reservoirs of ``capacity`` items, so memory does not grow with the data set). Each
    batch then holds the images of triplets drawn from those buffers: queries in proportion to their
    importance, far positives and near negatives preferred under the current embeddings, triplets
    that already satisfy ``margin`` dropped; when too few violate it, random images fill the batch.

    The engine feeds every trained batch back through ``observe``: it stores the embeddings (the
    distances used to pick positives and negatives) and sets each image's importance to its hardest
    in-batch triplet violation ``max(0, margin + max_p D_ap - min_n D_an)`` plus a small floor, so
    every image can still be drawn. Unseen images start with importance 1 and a zero embedding. With
    DataLoader workers the feedback lags by the few batches they prefetch. An epoch has as many
    batches as a P x K epoch; under DDP each rank samples its own batches (seeded by rank).
    """

    FLOOR = 1e-3

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        margin: float = 0.2,
        capacity: int = 16,
        temperature: float = 0.5,
        num_candidates: int = 32,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        values = torch.as_tensor(list(labels), dtype=torch.long)
        classes, self.labels = torch.unique(values, return_inverse=True)
        if len(classes) < 2 or batch_size < 3:
            raise DistillError(
                f"importance sampling needs at least 2 identities and batches of at least 3 images, "
                f"got {len(classes)} identities and batch size {batch_size}"
            )
        self.num_classes = len(classes)
        self.batch_size, self.margin, self.seed = batch_size, margin, seed
        self.options = {"capacity": capacity, "margin": margin, "temperature": temperature, "num_candidates": num_candidates}
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.importance = torch.ones(len(values), dtype=torch.float64)
        self.table: torch.Tensor | None = None  # [N, D] latest embeddings, allocated on the first observe

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, len(self.labels) // self.batch_size) // self.world_size

    def _embed(self, indices: torch.Tensor) -> torch.Tensor:
        return self.table[indices] if self.table is not None else torch.zeros(len(indices), 1)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)[0]))
        triplets = ImportanceTripletSampler(self.num_classes, generator=generator, **self.options)
        order = torch.randperm(len(self.labels), generator=generator)
        triplets.update(order, self.labels[order], self.importance[order])
        for _ in range(len(self)):
            drawn = triplets.sample(self.batch_size, embed=self._embed).flatten()
            batch = list(dict.fromkeys(drawn.tolist()))[: self.batch_size]  # unique, in draw order
            if len(batch) < self.batch_size:
                rest = torch.randperm(len(self.labels), generator=generator).tolist()
                taken = set(batch)
                batch += [i for i in rest if i not in taken][: self.batch_size - len(batch)]
            yield batch

    def observe(self, indices: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor) -> None:
        """Record a trained batch: its embeddings and each image's hardest triplet violation."""
        indices, emb, labels = indices.cpu().long(), emb.detach().float().cpu(), labels.cpu()
        if self.table is None:
            self.table = torch.zeros(len(self.labels), emb.shape[1])
        d = torch.cdist(emb, emb).pow(2)
        neg = labels.unsqueeze(0) != labels.unsqueeze(1)
        pos = ~neg & ~torch.eye(len(labels), dtype=torch.bool)
        far_pos = d.masked_fill(~pos, float("-inf")).amax(1)
        near_neg = d.masked_fill(~neg, float("inf")).amin(1)
        violation = (self.margin + far_pos - near_neg).clamp_min(0.0)
        violation = torch.where(pos.any(1) & neg.any(1), violation, torch.zeros_like(violation))
        self.table[indices] = emb
        self.importance[indices] = violation.double() + self.FLOOR

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """Importance scores and stored embeddings, for checkpoints (resume continues bit-for-bit)."""
        return {"importance": self.importance.clone(), "table": None if self.table is None else self.table.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        if state["importance"].shape != self.importance.shape:
            raise DistillError(
                f"sampler state covers {len(state['importance'])} images, this training set has {len(self.importance)}"
            )
        self.importance = state["importance"].clone()
        self.table = None if state["table"] is None else state["table"].clone()
