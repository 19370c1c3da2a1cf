"""Hardness-aware deep metric learning (HDML, Zheng et al. 2019) around a triplet or N-pair loss.

Each tuple's negative is pulled towards the anchor by an amount that grows as training converges
(Eq. 4), a generator maps the augmented tuple back onto the data manifold, and the metric loss is
a mix of the real and the synthetic tuple's loss (Eq. 11), weighted by how well the generator works.

Adaptation to this toolkit: a task loss sees only the model's L2-normalised embedding ``z``, not the
backbone feature ``y`` the paper reconstructs. The generator therefore maps embeddings to embeddings:
``z -> 512 -> ReLU -> 1024`` (the paper's two FC layers, 1024 = its feature width) followed by a
``1024 -> D`` layer standing in for the model's embedding layer, and an L2 normalisation. Its
reconstruction target is ``z`` itself. As in the authors' code, the generator and its softmax
classifier are trained only by ``J_gen`` and the classifier only on real embeddings, while
``J_metric``'s gradient flows through the (frozen) generator into the embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from distill.errors import DistillError
from distill.losses.common import check_labels
from distill.losses.metric import n_pair_indices, n_pair_loss, triplet_loss
from distill.losses.mining import positive_negative_masks
from distill.losses.registry import LossInputs, Term, number, register_loss

BASES = ("triplet", "npair")
DEFAULT_ALPHA = {"triplet": 0.05, "npair": 2.0}


def hardness_aware_negatives(z: Tensor, z_pos: Tensor, z_neg: Tensor, lam: float | Tensor) -> Tensor:
    """HDML Eq. 4: ``z^- -> z + [lam d(z, z^-) + (1 - lam) d+] / d(z, z^-) * (z^- - z)`` when
    ``d(z, z^-) > d+ = d(z, z^+)``, else ``z^-`` unchanged (Euclidean ``d``; shapes broadcast over the
    last dimension). ``lam = 1`` keeps the negative, ``lam = 0`` pulls it to the positive's distance."""
    d_pos = torch.linalg.vector_norm(z_pos - z, dim=-1, keepdim=True)
    d_neg = torch.linalg.vector_norm(z_neg - z, dim=-1, keepdim=True)
    harder = d_neg > d_pos
    d_safe = torch.where(harder, d_neg, torch.ones_like(d_neg))  # no 0/0 in the branch where() drops
    pulled = z + (lam * d_safe + (1.0 - lam) * d_pos) / d_safe * (z_neg - z)
    return torch.where(harder, pulled, z_neg)


def random_triplets(labels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One triplet per anchor that has a positive and a negative: positive and negative drawn
    uniformly (HDML synthesises the hardness, so no mining). Returns (anchor, positive, negative)."""
    pos, neg = positive_negative_masks(labels)
    a = (pos.any(1) & neg.any(1)).nonzero().squeeze(1)
    if len(a) == 0:
        return a, a, a
    p = torch.multinomial(pos[a].float(), 1, generator=generator).squeeze(1)
    n = torch.multinomial(neg[a].float(), 1, generator=generator).squeeze(1)
    return a, p, n


def _ema(buffer: Tensor, value: Tensor, decay: float) -> None:
    buffer.copy_(torch.where(torch.isinf(buffer), value, decay * buffer + (1.0 - decay) * value))


class HDMLLoss(nn.Module):
    """HDML around ``base`` = ``"triplet"`` (random triplets, squared-distance hinge with ``margin``)
    or ``"npair"`` (one pair per class). ``forward(emb, labels) -> (loss, stats)``.

    - ``lambda = exp(-alpha / J_avg)``, ``J_avg`` a running mean (EMA, ``decay``) of the real metric loss;
      ``alpha`` defaults to 0.05 (triplet) / 2.0 (N-pair), scaled to L2-normalised embeddings (the
      paper's 90 matches its unnormalised features).
    - ``J_gen = J_recon + soft_weight * J_soft``: ``J_recon = mean ||z - g(z)||^2`` on the real tuple,
      ``J_soft`` = cross-entropy of the synthetic tuple under the classifier (trained on real ``z``),
      which keeps synthetic labels.
    - ``J_metric = exp(-beta / J_gen) J(T) + (1 - exp(-beta / J_gen)) J(T~)`` with ``J_gen`` a running
      mean too. Both means start at +inf, so the first step uses real, unchanged tuples only.
    - ``loss = J_metric + J_gen + J_cls`` (``J_cls``: the classifier's cross-entropy on real ``z``); each
      part reaches only its own parameters, so one optimiser step matches the paper's three.
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        base: str = "triplet",
        margin: float = 0.2,
        alpha: float | None = None,
        beta: float = 1.0,
        soft_weight: float = 1.0,
        decay: float = 0.99,
    ) -> None:
        super().__init__()
        if base not in BASES:
            raise DistillError(f"unknown HDML base loss {base!r}; choose one of {', '.join(BASES)}")
        self.base = base
        self.margin = margin
        self.alpha = DEFAULT_ALPHA[base] if alpha is None else alpha
        self.beta = beta
        self.soft_weight = soft_weight
        self.decay = decay
        self.generator = nn.Sequential(
            nn.Linear(embed_dim, 512), nn.ReLU(), nn.Linear(512, 1024), nn.Linear(1024, embed_dim)
        )
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.register_buffer("j_avg", torch.tensor(math.inf))
        self.register_buffer("j_gen", torch.tensor(math.inf))

    def generate(self, z: Tensor, frozen: bool = False) -> Tensor:
        """Generator output on the unit sphere; ``frozen`` lets gradients reach ``z`` but not the weights."""
        if frozen:
            params = {k: v.detach() for k, v in self.generator.named_parameters()}
            return F.normalize(functional_call(self.generator, params, (z,)), dim=-1)
        return F.normalize(self.generator(z), dim=-1)

    def _tuples(self, emb: Tensor, labels: Tensor, lam: Tensor):
        """Real loss, synthetic loss, real tuple members and augmented members with their labels."""
        if self.base == "triplet":
            a, p, n = random_triplets(labels)
            z_a, z_p, z_n = emb[a], emb[p], emb[n]
            hat = torch.cat([z_a, z_p, hardness_aware_negatives(z_a, z_p, z_n, lam)])
            syn = self.generate(hat, frozen=True).view(3, len(a), emb.shape[1])
            j_real, j_syn = triplet_loss(z_a, z_p, z_n, self.margin), triplet_loss(*syn.unbind(0), self.margin)
            return j_real, j_syn, torch.cat([z_a, z_p, z_n]), hat, labels[torch.cat([a, p, n])]
        a, p = n_pair_indices(labels)
        z_a, z_p = emb[a], emb[p]
        k, d = len(a), emb.shape[1]
        z_neg = hardness_aware_negatives(z_a.unsqueeze(1), z_p.unsqueeze(1), z_p.unsqueeze(0), lam)  # [k, k, D]
        hat = torch.cat([z_a, z_neg.reshape(k * k, d)])
        syn = self.generate(hat, frozen=True)
        j_syn = n_pair_loss(syn[:k], syn[k:].reshape(k, k, d))
        return n_pair_loss(z_a, z_p), j_syn, torch.cat([z_a, z_p]), hat, torch.cat([labels[a], labels[p].repeat(k)])

    def forward(self, emb: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        check_labels(emb, labels)
        lam = torch.exp(-self.alpha / self.j_avg)
        w_real = torch.exp(-self.beta / self.j_gen)
        j_real, j_syn, real, hat, hat_labels = self._tuples(emb, labels, lam)
        j_metric = w_real * j_real + (1.0 - w_real) * j_syn
        real, hat = real.detach(), hat.detach()
        if len(real):
            j_recon = (self.generate(real) - real).pow(2).sum(1).mean()
            cls_w, cls_b = self.classifier.weight.detach(), self.classifier.bias.detach()
            j_soft = F.cross_entropy(F.linear(self.generate(hat), cls_w, cls_b), hat_labels)
        else:  # no tuple in this batch: nothing to reconstruct
            j_recon = j_soft = sum(p.sum() * 0.0 for p in self.generator.parameters())
        j_gen = j_recon + self.soft_weight * j_soft
        j_cls = F.cross_entropy(self.classifier(emb.detach()), labels)
        if self.training and len(real):
            _ema(self.j_avg, j_real.detach(), self.decay)
            _ema(self.j_gen, j_gen.detach(), self.decay)
        stats = {"real": j_real, "syn": j_syn, "gen": j_gen, "cls": j_cls, "lambda": lam, "w_real": w_real}
        values = torch.stack([v.detach().float() for v in stats.values()]).tolist()  # one device sync
        return j_metric + j_gen + j_cls, dict(zip(stats, values))


_HDML_DEFAULTS = {"hdml_alpha": None, "hdml_beta": 1.0, "hdml_soft_weight": 1.0, "hdml_decay": 0.99}
_HDML_CHECKS = {
    "hdml_alpha": number(0.0, strict=True, optional=True),  # None = DEFAULT_ALPHA of the base
    "hdml_beta": number(0.0, strict=True),
    "hdml_soft_weight": number(0.0),
    "hdml_decay": number(0.0, high=1.0),  # EMA decay of J_avg and J_gen
}


class _HDMLTerm(nn.Module):
    base = "triplet"

    def __init__(
        self, embed_dim: int, num_classes: int, hdml_alpha: float | None, hdml_beta: float, hdml_soft_weight: float,
        hdml_decay: float, triplet_margin: float = 0.2,
    ) -> None:
        super().__init__()
        self.hdml = HDMLLoss(
            embed_dim, num_classes, base=self.base, margin=triplet_margin, alpha=hdml_alpha, beta=hdml_beta,
            soft_weight=hdml_soft_weight, decay=hdml_decay,
        )

    def forward(self, x: LossInputs) -> Term:
        value, stats = self.hdml(x.emb, x.labels)
        return Term(value, stats)


@register_loss(
    "hdml-triplet", kind="task", defaults={"triplet_margin": 0.2, **_HDML_DEFAULTS}, checks=_HDML_CHECKS,
    needs=("labels", "positives"), learnable=True,
)
class HDMLTriplet(_HDMLTerm):
    """HDML around the triplet loss"""

    base = "triplet"


@register_loss("hdml-npair", kind="task", defaults=_HDML_DEFAULTS, checks=_HDML_CHECKS, needs=("labels", "positives"), learnable=True)
class HDMLNPair(_HDMLTerm):
    """HDML around the N-pair loss"""

    base = "npair"
