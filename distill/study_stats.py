"""The statistics of ``distill study`` (pure functions): per recipe the mean and sample standard
deviation of every metric over the seeds, and the paired difference ``d_s = recipe_s - baseline_s``
with the 95% paired-t confidence interval ``mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)`` (none with
one seed) and wins/losses/ties."""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from scipy import stats

BASELINE = "baseline"  # the recipe every other one is compared with, seed by seed
TIE_TOLERANCE = 1e-9
STALL_SHARE = 0.75  # a seed below this share of its recipe's other seeds' median looks stalled


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for a single value)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def paired_gain(recipe: dict[int, float], baseline: dict[int, float], level: float = 0.95) -> dict[str, Any]:
    """Paired difference ``recipe[s] - baseline[s]`` over the seeds both have.

    Returns ``n``, ``mean``, ``std`` (sample), ``ci`` = ``[mean - h, mean + h]`` with
    ``h = t.ppf((1 + level) / 2, n - 1) * std / sqrt(n)`` (paired t; None when n < 2), and the number of
    seeds where the recipe ``wins`` (d > 0), ``losses`` (d < 0) and ``ties`` (|d| <= 1e-9).
    """
    seeds = sorted(set(recipe) & set(baseline))
    if not seeds:
        raise ValueError("no seed in common with the baseline")
    diffs = [recipe[s] - baseline[s] for s in seeds]
    mean, std = mean_std(diffs)
    ci = None
    if std is not None:
        half = stats.t.ppf((1 + level) / 2, len(diffs) - 1) * std / math.sqrt(len(diffs))
        ci = [mean - half, mean + half]
    return {
        "n": len(diffs),
        "mean": mean,
        "std": std,
        "ci": ci,
        "wins": sum(d > TIE_TOLERANCE for d in diffs),
        "losses": sum(d < -TIE_TOLERANCE for d in diffs),
        "ties": sum(abs(d) <= TIE_TOLERANCE for d in diffs),
    }


def per_recipe(results: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """``{recipe: {seed: metrics}}`` from results ``{"recipe", "seed", "metrics"}``, in their order."""
    by: dict[str, dict[int, dict[str, float]]] = {}
    for r in results:
        by.setdefault(r["recipe"], {})[r["seed"]] = r["metrics"]
    return by


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{recipe: {"n", "metrics": {m: {"mean", "std"}}, "gain": {m: paired_gain} or None}}`` from
    results ``{"recipe", "seed", "metrics"}``; the gain is None for the baseline itself."""
    by = per_recipe(results)
    base = by.get(BASELINE, {})
    summary = {}
    for name, per_seed in by.items():
        names = sorted({m for metrics in per_seed.values() for m in metrics})
        column = {m: {s: met[m] for s, met in per_seed.items() if met.get(m) is not None} for m in names}
        metrics = {m: dict(zip(("mean", "std"), mean_std(list(v.values())))) for m, v in column.items() if v}
        gain = None
        if name != BASELINE:
            gain = {}
            for m, v in column.items():
                ref = {s: base[s][m] for s in base if base[s].get(m) is not None}
                if set(v) & set(ref):
                    gain[m] = paired_gain(v, ref)
        summary[name] = {"n": len(per_seed), "metrics": metrics, "gain": gain}
    return summary


def stalled_seeds(results: list[dict[str, Any]], metric: str = "map", share: float = STALL_SHARE) -> list[str]:
    """One warning per seed whose ``metric`` is below ``share`` x the median of the same recipe's
    other seeds (at least 3 of them): a training that stalled or collapsed while its siblings
    learnt. The "has it learnt?" check of one training cannot see this (a stalled student may
    still be far above its untrained score); a study can, and its mean and interval include it."""
    warnings = []
    for name, metrics in per_recipe(results).items():
        per_seed = {s: m[metric] for s, m in metrics.items() if m.get(metric) is not None}
        for seed, value in per_seed.items():
            others = [v for s, v in per_seed.items() if s != seed]
            if len(others) < 3:
                continue
            median = statistics.median(others)
            if value < share * median:
                warnings.append(
                    f"{name} seed {seed}: {metric} {value:.3f} is {1 - value / median:.0%} below the median of the "
                    f"other seeds ({median:.3f}): this training may have stalled (see its log); the mean and "
                    "interval above include it"
                )
    return warnings
