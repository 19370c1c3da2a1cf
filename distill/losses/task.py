"""The engine-facing task loss: a weighted sum of the seed papers' losses, chosen by a spec string.

    task = build_task_loss("softmax=1,triplet=1,lifted=0.5", embed_dim=128, num_classes=751)
    total, parts = task(emb, logits, labels)            # parts: {"softmax": 2.3, "triplet": 0.1, ...}
    optimizer = torch.optim.AdamW([*model.parameters(), *task.parameters()])

Learnable parts (verification head, L-Softmax weights, HDML generator and classifier) are
submodules, so ``task.parameters()`` is optimised with the model and ``task.state_dict()`` goes into
checkpoints (it also holds HDML's running means).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.hdml import HDMLLoss
from distill.losses.metric import (
    MINING,
    LargeMarginSoftmax,
    VerificationHead,
    batch_n_pair_loss,
    batch_triplet_terms,
    l2_weight_penalty,
    lifted_structured_loss,
    log_ratio_loss,
    softmax_loss,
    _masked_mean,
    verification_loss,
)
from distill.losses.mining import check_labels

LOSSES: dict[str, str] = {
    "softmax": "cross-entropy on the classifier logits",
    "verification": "same/different identity on (f_i - f_j)^2 of minibatch pairs",
    "lsoftmax": "large-margin softmax (L-Softmax) on the embedding",
    "triplet": "triplet hinge on squared distances with batch mining",
    "lifted": "lifted structured loss",
    "npair": "multi-class N-pair loss",
    "logratio": "log-ratio loss on the teacher's embedding distances",
    "hdml-triplet": "HDML around the triplet loss",
    "hdml-npair": "HDML around the N-pair loss",
}

HPARAMS: dict[str, Any] = {
    "triplet_margin": 0.2,  # g, on squared distances of L2-normalised embeddings (also hdml-triplet)
    "triplet_mining": "hard",  # all | hard | semihard
    "verification_balanced": True,  # positive and negative pairs weigh one half each
    "lsoftmax_margin": 2,  # integer m; 1 = plain softmax
    "lsoftmax_lambda": 0.0,  # (lambda cos + psi) / (1 + lambda) training trick; 0 = pure L-Softmax
    "lifted_margin": 1.0,  # alpha
    "npair_scale": 16.0,  # similarities x scale on L2-normalised embeddings (1 = Sohn's unscaled form)
    "logratio_eps": 1e-6,  # inside the logs
    "hdml_alpha": None,  # None = 0.05 (hdml-triplet) / 2.0 (hdml-npair)
    "hdml_beta": 1.0,
    "hdml_soft_weight": 1.0,
    "hdml_decay": 0.99,  # EMA decay of J_avg and J_gen
    "weight_l2": 0.0,  # Deep Ranking's lambda (0.001 in the paper), per step divided by the T terms of the mean
}


def task_loss_names() -> list[str]:
    """Loss names accepted in a ``--loss`` spec."""
    return list(LOSSES)


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """``"softmax=1,triplet=1,lifted=0.5"`` -> ``[("softmax", 1.0), ...]``; a bare name weighs 1."""
    valid = ", ".join(LOSSES)
    terms: list[tuple[str, float]] = []
    for item in spec.split(","):
        name, sep, weight_text = (part.strip() for part in item.partition("="))
        if not name or (sep and not weight_text):
            raise DistillError(f"malformed loss spec {spec!r}; expected NAME[=WEIGHT],... with NAME one of {valid}")
        if name not in LOSSES:
            raise DistillError(f"unknown loss {name!r} in {spec!r}; valid names: {valid}")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise DistillError(f"loss weight {weight_text!r} for {name!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise DistillError(f"loss weight for {name!r} must be a finite number >= 0, got {weight_text!r}")
        if name in (n for n, _ in terms):
            raise DistillError(f"loss {name!r} appears twice in {spec!r}; give each loss once")
        terms.append((name, weight))
    return terms


class TaskLoss(nn.Module):
    """Weighted sum of task losses. ``forward(emb, logits, labels, teacher_emb=None)`` returns the total
    and each loss's unweighted value (HDML adds its parts as ``"hdml-triplet.lambda"`` etc.)."""

    def __init__(
        self, terms: list[tuple[str, float]], embed_dim: int, num_classes: int, hparams: dict[str, Any]
    ) -> None:
        super().__init__()
        self.terms = terms
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.hparams = hparams
        self.mean_terms: Tensor | int = 1  # T of the last forward's mean-reduced loss (weight_penalty divides by it)
        names = {n for n, _ in terms}
        self.heads = nn.ModuleDict()
        if "verification" in names:
            self.heads["verification"] = VerificationHead(embed_dim)
        if "lsoftmax" in names:
            self.heads["lsoftmax"] = LargeMarginSoftmax(
                embed_dim, num_classes, hparams["lsoftmax_margin"], hparams["lsoftmax_lambda"]
            )
        for base in ("triplet", "npair"):
            if f"hdml-{base}" in names:
                self.heads[f"hdml-{base}"] = HDMLLoss(
                    embed_dim,
                    num_classes,
                    base=base,
                    margin=hparams["triplet_margin"],
                    alpha=hparams["hdml_alpha"],
                    beta=hparams["hdml_beta"],
                    soft_weight=hparams["hdml_soft_weight"],
                    decay=hparams["hdml_decay"],
                )

    def _check(self, emb: Tensor, logits: Tensor, labels: Tensor, teacher_emb: Tensor | None) -> None:
        check_labels(emb, labels)
        if emb.shape[1] != self.embed_dim:
            raise DistillError(
                f"embedding width {emb.shape[1]} does not match the task loss's embed_dim {self.embed_dim}"
            )
        if logits.shape != (len(labels), self.num_classes):
            raise DistillError(
                f"logits must be [N, num_classes] = [{len(labels)}, {self.num_classes}], got {tuple(logits.shape)}"
            )
        lo, hi = torch.stack([labels.min(), labels.max()]).tolist() if len(labels) else (0, 0)
        if lo < 0 or hi >= self.num_classes:
            raise DistillError(
                f"labels must be class indices 0..{self.num_classes - 1}, got {lo}..{hi}; remap them first"
            )
        if any(n == "logratio" for n, _ in self.terms):
            if teacher_emb is None:
                raise DistillError(
                    "the logratio loss needs a teacher: its targets are the teacher's embeddings "
                    "(log-ratio distillation); pass teacher_emb or drop logratio from --loss"
                )
            if teacher_emb.dim() != 2 or len(teacher_emb) != len(labels):
                raise DistillError(
                    f"teacher_emb must be [N, d] with N = {len(labels)}, got {tuple(teacher_emb.shape)}"
                )

    def forward(
        self, emb: Tensor, logits: Tensor, labels: Tensor, teacher_emb: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        self._check(emb, logits, labels, teacher_emb)
        wide = torch.promote_types(emb.dtype, torch.float32)  # losses in float32 (at least) under AMP
        emb, logits = emb.to(wide), logits.to(wide)
        hp = self.hparams
        parts: dict[str, Tensor] = {}
        extra: dict[str, float] = {}
        total = emb.new_zeros(())
        self.mean_terms = len(labels)
        for name, weight in self.terms:
            if name == "softmax":
                value = softmax_loss(logits, labels)
            elif name == "verification":
                value = verification_loss(emb, labels, self.heads[name], hp["verification_balanced"])
            elif name == "lsoftmax":
                value = self.heads[name](emb, labels)
            elif name == "triplet":
                hinges, counted = batch_triplet_terms(emb, labels, hp["triplet_margin"], hp["triplet_mining"])
                value = _masked_mean(hinges, counted)
                self.mean_terms = counted.sum()
            elif name == "lifted":
                value = lifted_structured_loss(emb, labels, hp["lifted_margin"])
            elif name == "npair":
                value = batch_n_pair_loss(emb, labels, hp["npair_scale"])
            elif name == "logratio":
                value = log_ratio_loss(emb, teacher_emb.to(wide), hp["logratio_eps"])
            else:  # hdml-triplet / hdml-npair
                value, stats = self.heads[name](emb, labels)
                extra.update({f"{name}.{k}": v for k, v in stats.items()})
            parts[name] = value
            total = total + weight * value
        values = torch.stack([v.detach().float() for v in parts.values()]).tolist()  # one device sync
        return total, {**dict(zip(parts, values)), **extra}

    def weight_penalty(self, model: nn.Module) -> Tensor:
        """Deep Ranking's ``lambda ||W||^2`` over the model's (and this module's) weight matrices,
        ``lambda = weight_l2``, added to every training step when ``weight_l2 > 0``.

        The paper minimises ``sum_triplets hinge + lambda ||W||^2``; this loss takes the *mean* over
        the T triplets of the batch, so the penalty is divided by T to keep the paper's balance
        (``mean + lambda / T ||W||^2 = (sum + lambda ||W||^2) / T``). T is counted in the last forward:
        the triplet term's triplets (as mined), or the batch size when there is no triplet term.
        """
        terms = torch.as_tensor(self.mean_terms).clamp_min(1)
        return l2_weight_penalty([*model.parameters(), *self.parameters()], self.hparams["weight_l2"]) / terms


# losses that compare images of one identity within a batch: nothing to compare with one image per identity
NEEDS_POSITIVES = ("verification", "triplet", "lifted", "npair", "hdml-triplet", "hdml-npair")
# range of each numeric hyper-parameter: (lower bound, lower bound excluded, upper bound excluded or None)
HPARAM_RANGES: dict[str, tuple[float, bool, float | None]] = {
    "triplet_margin": (0.0, True, None),
    "lsoftmax_lambda": (0.0, False, None),
    "lifted_margin": (0.0, True, None),
    "npair_scale": (0.0, True, None),
    "logratio_eps": (0.0, True, None),
    "hdml_alpha": (0.0, True, None),
    "hdml_beta": (0.0, True, None),
    "hdml_soft_weight": (0.0, False, None),
    "hdml_decay": (0.0, False, 1.0),
    "weight_l2": (0.0, False, None),
}


def check_task_loss(spec: str, hparams: dict[str, Any]) -> tuple[list[tuple[str, float]], dict[str, Any]]:
    """``(terms, hyper-parameters with defaults)`` of a ``--loss`` spec and ``--loss-opt`` values, each
    checked: called when the config is read, so a bad value fails before any training."""
    terms = parse_loss_spec(spec)
    unknown = sorted(set(hparams) - set(HPARAMS))
    if unknown:
        raise DistillError(f"unknown task-loss hyper-parameter(s) {', '.join(unknown)}; valid: {', '.join(HPARAMS)}")
    hp = {**HPARAMS, **hparams}
    if hp["triplet_mining"] not in MINING:
        raise DistillError(f"triplet_mining must be one of {', '.join(MINING)}, got {hp['triplet_mining']!r}")
    m = hp["lsoftmax_margin"]
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise DistillError(f"lsoftmax_margin must be an integer >= 1, got {m!r}")
    if not isinstance(hp["verification_balanced"], bool):
        raise DistillError(f"verification_balanced must be true or false, got {hp['verification_balanced']!r}")
    for key, (low, strict, high) in HPARAM_RANGES.items():
        value = hp[key]
        if value is None and HPARAMS[key] is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DistillError(f"{key} must be a finite number, got {value!r}")
        if value < low or (strict and value == low) or (high is not None and value >= high):
            bound = f"{'>' if strict else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
            raise DistillError(f"{key} must be {bound}, got {value:g}")
    return terms, hp


def build_task_loss(spec: str, embed_dim: int, num_classes: int, **hparams: Any) -> TaskLoss:
    """Parse ``spec`` (``--loss``), check ``hparams`` against ``HPARAMS`` and build the ``TaskLoss``."""
    terms, hp = check_task_loss(spec, hparams)
    if embed_dim < 1 or num_classes < 1:
        raise DistillError(f"embed_dim and num_classes must be positive, got {embed_dim} and {num_classes}")
    return TaskLoss(terms, embed_dim, num_classes, hp)
