"""A report on disk: ``report.json``, ``report.md`` and ``speed_vs_accuracy.png`` written atomically,
and ``report.json`` read back (``distill report``) with every value the console needs checked."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from distill.atomic import atomic_write_bytes, atomic_write_text
from distill.errors import DistillError
from distill.report.build import METRIC_LABELS, MODEL_KEYS, _jsonable
from distill.report.plot import plot_png
from distill.report.text import to_markdown


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``speed_vs_accuracy.png`` atomically into ``out_dir``."""
    out = Path(out_dir)
    return {
        "json": atomic_write_text(out / "report.json", json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n"),
        "md": atomic_write_text(out / "report.md", to_markdown(report)),
        "png": atomic_write_bytes(out / "speed_vs_accuracy.png", plot_png(report)),
    }


def load_report(path: str | os.PathLike) -> dict:
    """Read a saved ``report.json`` (for ``distill report``)."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"no report at {path}: give a run directory or report.json written by `distill run`")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DistillError(f"malformed report {path}: {err}") from None
    if not isinstance(report, dict) or not isinstance(report.get("models"), list) or "speedup_like_for_like" not in report:
        raise DistillError(f"malformed report {path}: expected an object with 'models' and 'speedup_like_for_like'")
    for m in report["models"]:
        if not isinstance(m, dict) or not all(k in m for k in (*MODEL_KEYS, "metrics")):
            raise DistillError(f"malformed report {path}: every model needs {', '.join((*MODEL_KEYS, 'metrics'))}")
    problem = report_problem(report)
    if problem:
        raise DistillError(f"malformed report {path}: {problem}")
    return report


def _numbers(value: Any) -> bool:
    """A number or null (how a report stores a value it could not measure)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _all_measured(values: dict, keys: tuple[str, ...]) -> bool:
    """Every one of ``keys`` in ``values`` is a number (not null)."""
    return all(values.get(k) is not None and _numbers(values.get(k)) for k in keys)


def report_problem(report: dict) -> str | None:
    """What in a report read from disk (``models`` rows with ``MODEL_KEYS`` and ``metrics``) ``print_report``
    could not show, in words, or None: a hand-edited or foreign ``report.json`` is one clear line."""
    if not report["models"]:
        return "'models' is empty (a report has at least the teacher's row)"
    for i, m in enumerate(report["models"]):
        for key in ("name", "runtime"):
            if not isinstance(m[key], str):
                return f"models[{i}].{key} must be a string, got {m[key]!r}"
        for key in ("precision", "provider", "device"):
            if m.get(key) is not None and not isinstance(m[key], str):
                return f"models[{i}].{key} must be a string or null, got {m[key]!r}"
        for key in (*MODEL_KEYS[2:], "speedup", "speedup_like_for_like"):
            if not _numbers(m.get(key)):
                return f"models[{i}].{key} must be a number or null, got {m[key]!r}"
        for key in ("metrics", "kept", "drop", "gain"):
            value = m.get(key)
            if (key == "metrics" or value is not None) and not (isinstance(value, dict) and all(map(_numbers, value.values()))):
                return f"models[{i}].{key} must be an object of numbers, got {value!r}"
    like = report["speedup_like_for_like"]
    if not isinstance(like, dict) or not all(map(_numbers, like.values())):
        return f"'speedup_like_for_like' must be an object of numbers per runtime, got {like!r}"
    if not _numbers(report.get("speedup")):
        return f"'speedup' must be a number or null, got {report['speedup']!r}"
    metrics = report.get("accuracy_metrics") or []
    if not isinstance(metrics, list) or not all(m in METRIC_LABELS for m in metrics + [report.get("pareto_metric") or "map"]):
        return f"accuracy_metrics and pareto_metric must name metrics of {', '.join(METRIC_LABELS)}"
    target, gate, layer = report.get("target"), report.get("teacher_gate"), report.get("teacher_layer")
    if target is not None and not (isinstance(target, dict) and isinstance(target.get("message"), str)):
        return f"'target' must be an object with a message, got {target!r}"
    if gate is not None and not (isinstance(gate, dict) and (gate.get("verdict") == "skipped" or (
            isinstance(gate.get("metric"), str) and _all_measured(gate, ("teacher", "baseline", "margin"))))):
        return f"'teacher_gate' must be an object with metric, teacher, baseline, margin and verdict, got {gate!r}"
    if layer is not None and not (isinstance(layer, dict) and isinstance(layer.get("chosen"), str)):
        return f"'teacher_layer' must be an object with the chosen layer, got {layer!r}"
    return _selection_problem(report.get("selection"))


def _selection_problem(selection: Any) -> str | None:
    """What in ``report['selection']`` (per model: kept, last and highest epoch scores) cannot be shown."""
    if selection is None:
        return None
    if not isinstance(selection, dict):
        return f"'selection' must be an object per model, got {selection!r}"
    needed = ("best_epoch", "best_score", "last_score", "top_score", "top_epoch")
    for name, fit in selection.items():
        if not (isinstance(fit, dict) and _all_measured(fit, needed) and all(_numbers(fit.get(k)) for k in ("chance", "untrained_score"))):
            return f"selection.{name} must hold numbers {', '.join(needed)} (chance, untrained_score: numbers or null), got {fit!r}"
        retry = fit.get("retry")
        if retry is not None and not (isinstance(retry, dict) and _all_measured(retry, ("lr", "first_lr"))
                                      and isinstance(retry.get("first"), dict) and _all_measured(retry["first"], ("best_score",))
                                      and _numbers(retry["first"].get("untrained_score"))):
            return f"selection.{name}.retry must hold numbers lr, first_lr and first.best_score, got {retry!r}"
    return None
