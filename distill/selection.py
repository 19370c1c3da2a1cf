"""Which validated epoch to keep, and whether a model has learnt (is better than chance and than untrained).

The rule (``fit`` applies it after every validation round): a validator scores every validation
query (e.g. each image's average precision); a round's score is their mean. The kept epoch is the
**latest** round whose score is within ``NOISE_SE`` standard errors of the highest score seen, the
standard error being that of the mean per-query difference between the two rounds (paired: the
same queries). So an earlier round wins only when it is better by more than the noise of the
score; a lucky early round of a model that has not learnt yet cannot beat the trained model on a
handful of queries. A validator that returns a single number has no noise estimate: the highest
score wins, ties going to the later round.

Learning: the untrained model is validated too (:func:`untrained`, before the first epoch). It is
never kept; it is the reference a trained model must beat to have learnt: by more than that noise,
and either by ``MIN_LEARNT`` of the way from the untrained score to a perfect 1 or by doubling it
(on hard data every score is low: a CUHK03 student at 0.036 against 0.011 untrained has learnt; one
whose classifier never left ``ln C`` kept 0.016: significant, and useless).

Chance: the expected average precision of a uniformly random ranking. A query with ``R`` matches
among ``N`` gallery items has ``E[AP] = (H_N + (R - 1) / (N - 1) * (N - H_N)) / N`` (``H_N`` the
N-th harmonic number): rank n holds a match with probability R/N, and given that, the ranks above
it hold (n - 1)(R - 1)/(N - 1) matches on average, so ``E[AP] = (1/R) sum_n (R/N) E[hits@n]/n``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

NOISE_SE = 2.0  # an earlier round must be better by more than this many standard errors to be kept
CHANCE_FACTOR = 2.0  # a kept score below this many times the chance level is "near chance"
MIN_LEARNT = 0.05  # a trained model closes at least this share of the way from its untrained score to 1 ...
UNTRAINED_FACTOR = 2.0  # ... or scores at least this many times its untrained score (hard data: all scores low)
EULER_GAMMA = 0.5772156649015329


def _as_queries(scores: float | Sequence[float] | Tensor) -> list[float]:
    if isinstance(scores, Tensor):
        return scores.double().flatten().tolist()
    return [float(scores)] if isinstance(scores, (int, float)) else [float(s) for s in scores]


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error ``sd / sqrt(n)`` (0 with fewer than 2 values: no estimate)."""
    t = torch.tensor(values, dtype=torch.float64)
    se = float(t.std(correction=1) / math.sqrt(len(t))) if len(t) > 1 else 0.0
    return float(t.mean()), se


def untrained(scores: float | Sequence[float] | Tensor) -> dict:
    """The selection record before the first epoch: the untrained model's validation round, the
    reference :func:`summary` checks the kept round against (never a round that can be kept)."""
    queries = _as_queries(scores)
    return {"untrained": {"score": mean_and_se(queries)[0], "queries": queries}}


def update(record: dict | None, scores: float | Sequence[float] | Tensor, epoch: int) -> tuple[dict, bool]:
    """Fold one validation round (``scores``: per query, or one number) into the selection ``record``
    (None, or :func:`untrained`'s, before the first round).

    Returns the new record and whether this round's weights are now the kept ones. The record (plain
    numbers and lists, so it checkpoints with ``weights_only``) holds the kept round (``epoch``,
    ``score``, ``se``, ``queries``), the highest-scoring round (``top``, with its per-query scores),
    the last round (``last_epoch``, ``last_score``) and the untrained round when there was one.
    """
    queries = _as_queries(scores)
    score, se = mean_and_se(queries)
    first = record is None or "epoch" not in record
    top = None if first else record["top"]
    if top is None or score > top["score"]:
        top = {"epoch": epoch, "score": score, "queries": queries}
    keep = first or top["epoch"] == epoch or not clearly_better(top["queries"], queries)
    # a record checkpointed before se and the kept round's queries were stored has neither
    kept = ({"epoch": epoch, "score": score, "se": se, "queries": queries} if keep
            else {"epoch": record["epoch"], "score": record["score"], "se": record.get("se", 0.0),
                  "queries": record.get("queries")})
    reference = {"untrained": record["untrained"]} if record and "untrained" in record else {}
    return kept | {"top": top, "last_epoch": epoch, "last_score": score} | reference, keep


def clearly_better(first: Sequence[float], second: Sequence[float]) -> bool:
    """Is ``first`` better than ``second`` by more than ``NOISE_SE`` standard errors of the paired
    per-query difference? With one number each (no noise estimate): simply higher."""
    if len(first) != len(second):
        raise ValueError(f"validation rounds scored {len(first)} and {len(second)} queries: they must be the same queries")
    diff, se = mean_and_se([a - b for a, b in zip(first, second)])
    return diff > NOISE_SE * se


def summary(record: dict | None) -> dict:
    """The selection as ``fit_summary`` reports it (empty without validation). With an untrained
    round: its score and ``learnt`` (:func:`has_learnt`)."""
    if record is None or "epoch" not in record:
        return {}
    reference = record.get("untrained")
    return {
        "best_epoch": record["epoch"], "best_score": record["score"], "best_score_se": record["se"],
        "top_epoch": record["top"]["epoch"], "top_score": record["top"]["score"],
        "last_epoch": record["last_epoch"], "last_score": record["last_score"],
    } | ({"untrained_score": reference["score"], "learnt": has_learnt(record["queries"], reference["queries"])}
         if reference and record.get("queries") is not None else {})


def has_learnt(kept: Sequence[float], untrained: Sequence[float]) -> bool:
    """Does the kept round beat the untrained one by more than the noise, and either by ``MIN_LEARNT``
    of the way from the untrained score to 1 (scores are APs, at most 1) or by ``UNTRAINED_FACTOR``?"""
    before, after = mean_and_se(untrained)[0], mean_and_se(kept)[0]
    far_enough = after - before >= MIN_LEARNT * (1.0 - before) or after >= UNTRAINED_FACTOR * before
    return clearly_better(kept, untrained) and far_enough


def selection_line(desc: str, record: dict) -> str:
    """One line saying which epoch was kept and why (the highest, the last and the untrained score beside it)."""
    s = summary(record)
    line = f"{desc}: kept epoch {s['best_epoch']} (validation {s['best_score']:.3f}"
    line += f" ± {s['best_score_se']:.3f})" if s["best_score_se"] else ")"
    if s["top_epoch"] != s["best_epoch"]:
        line += (f"; the highest, {s['top_score']:.3f} at epoch {s['top_epoch']}, is not better by more than "
                 f"{NOISE_SE:g} standard errors, so the later epoch is kept")
    line += f"; last epoch {s['last_epoch']}: {s['last_score']:.3f}"
    return line + (f"; untrained: {s['untrained_score']:.3f}" if "untrained_score" in s else "")


def harmonic(n: Tensor) -> Tensor:
    """H_n = 1 + 1/2 + ... + 1/n (elementwise, float64)."""
    return torch.special.digamma(n.double() + 1) + EULER_GAMMA


def random_ranking_ap(relevant: Tensor | Sequence[int], gallery: Tensor | Sequence[int] | int) -> Tensor:
    """Expected average precision of a uniformly random ranking, per query: ``relevant`` matches
    among ``gallery`` ranked items (see the module docstring for the formula)."""
    r = torch.as_tensor(relevant, dtype=torch.float64)
    n = torch.as_tensor(gallery, dtype=torch.float64).expand_as(r)
    if bool(((r < 1) | (r > n)).any()):
        raise ValueError("every query needs 1 <= matches <= gallery size")
    h = harmonic(n)
    spread = torch.where(n > 1, (r - 1) / (n - 1).clamp(min=1), 0.0)
    return (h + spread * (n - h)) / n


def near_chance(score: float, se: float, chance: float) -> bool:
    """A kept score below ``CHANCE_FACTOR`` x the chance level, or not above it by more than
    ``NOISE_SE`` standard errors: the model ranks about as well as a random ranking."""
    return score < CHANCE_FACTOR * chance or score - chance <= NOISE_SE * se


def chance_note(name: str, fit: dict, chance: float) -> str | None:
    """A warning sentence when the kept model of ``name`` is near chance, or no better than it was
    untrained (None otherwise)."""
    if "best_score" not in fit:
        return None
    kept = f"kept score {fit['best_score']:.3f} (epoch {fit['best_epoch']})"
    advice = "train it longer or with another learning rate, or check the data"
    if near_chance(fit["best_score"], fit.get("best_score_se", 0.0), chance):
        return (f"{name} is near chance on validation: {kept} vs {chance:.3f} for a random ranking; it has not "
                f"learnt to tell these identities apart: {advice}")
    if fit.get("learnt") is False:
        return (f"{name} has learnt little or nothing on validation: {kept} vs {fit['untrained_score']:.3f} untrained "
                f"(a model that learns doubles it or gets {MIN_LEARNT:.0%} of the way to 1, beyond the noise): {advice}")
    return None


def has_not_learnt(fit: dict) -> bool:
    """A training summary whose kept model is near chance or no better than untrained (``chance_check``)."""
    return bool(fit.get("near_chance")) or fit.get("learnt") is False
