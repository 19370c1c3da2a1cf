"""The speed-versus-accuracy report: one table (rich), ``report.json``, ``report.md`` and a PNG plot.

Speedup is always shown two ways, never only the flattering one:
- **deployment**: teacher as users run it today (PyTorch eager) vs the exported student in ONNX
  Runtime, ``teacher torch p50 / student onnxruntime p50`` (runtime and architecture together);
- **like-for-like**: teacher and student in the same runtime, ``teacher p50 / student p50`` per runtime
  (the architecture alone).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from distill.atomic import atomic_write_bytes, atomic_write_text
from distill.config import PRECISIONS
from distill.console import make_console
from distill.errors import DistillError
from distill.protocols import PROTOCOLS, REID
from distill.protocols import protocol as protocol_named

MODEL_NAMES = ("teacher", "student_baseline", "student")  # a row's role
RUNTIMES = ("torch", "onnxruntime")
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map", "rank1")
MODEL_KEYS = ("name", "runtime", "params", "gflops", "latency_ms_p50", "latency_ms_p90", "throughput_ips")
METRIC_LABELS = {"recall@1": "R@1", "map": "mAP", "rank1": "rank-1"}
REID_NOTE = REID.note


def accuracy_metrics(protocol: str) -> tuple[str, str]:
    """The two metrics of the drop/gain/kept columns: the protocol's headline (re-ID: rank-1 and mAP;
    retrieval: Recall@1 and mAP)."""
    return protocol_named(protocol).headline


def pareto_metric(protocol: str) -> str:
    """The accuracy axis of the Pareto front and the plot: the protocol's (re-ID: mAP; retrieval: Recall@1)."""
    return protocol_named(protocol).pareto_metric


def pareto_front(points: list[tuple[float | None, float | None]]) -> list[bool]:
    """Which ``(latency, accuracy)`` points are on the Pareto front (lower latency, higher accuracy is better).

    A point is on the front when no other point is at least as fast and at least as accurate and
    strictly better in one of the two; points with a missing value are never on it.
    """
    ok = [x is not None and y is not None for x, y in points]
    return [
        ok[i] and not any(ok[j] and xj <= x and yj >= y and (xj < x or yj > y) for j, (xj, yj) in enumerate(points))
        for i, (x, y) in enumerate(points)
    ]


def _jsonable(obj):
    """What ``json.loads(json.dumps(obj))`` gives: tuples become lists, paths strings, NaN/inf None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return _jsonable(obj.item())
    return str(obj)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _find(models: list[dict], role: str, runtime: str | None = None, student: str | None = None) -> dict | None:
    """The first row with this role (and runtime, and student spec when given), fp32 rows first."""
    hits = [m for m in models if m.get("role", m["name"]) == role and runtime in (None, m["runtime"])
            and (student is None or m.get("student") == student)]
    return min(hits, key=lambda m: m.get("precision", "fp32") != "fp32", default=None)


UNSTABLE = "?"  # after a timing whose rounds disagreed (``stable: false``), and after a speedup from one
UNSTABLE_NOTE = (
    f"{UNSTABLE} = from a timing that was not stable (the medians of its last two rounds of calls differed by more "
    "than 5%, e.g. on a busy machine): rerun `distill bench` on a quiet machine before trusting it"
)


def _unstable(*rows: dict | None) -> bool:
    """True when any of the rows' timings was not stable (``"stable": false``)."""
    return any(isinstance(r, dict) and r.get("stable") is False for r in rows)


def _timing(value, spec: str, suffix: str, unstable: bool) -> str:
    """A formatted timing or speedup, marked ``?`` when it comes from an unstable timing."""
    return _fmt(value, spec, suffix) + (UNSTABLE if unstable and value is not None else "")


def _metric_diff(a: dict | None, b: dict | None, keys=None) -> dict[str, float] | None:
    """``a - b`` for every metric (or those in ``keys``) both have a number for (``None`` when either model is missing)."""
    if a is None or b is None:
        return None
    return {k: a["metrics"][k] - b["metrics"][k] for k in (keys or a["metrics"])
            if a["metrics"].get(k) is not None and b["metrics"].get(k) is not None}


def _label(row: dict) -> str:
    return f"{row['name']} ({row['runtime']} {row.get('precision') or 'fp32'})"


def share_of_lead(distilled: float | None, baseline: float | None, teacher: float | None) -> float | None:
    """The share of the teacher's lead over the student trained alone that distillation kept:
    ``(distilled - baseline) / (teacher - baseline)``; None when a value is missing or the teacher
    does not lead (``teacher <= baseline``: there is no lead to keep)."""
    if distilled is None or baseline is None or teacher is None or teacher <= baseline:
        return None
    return (distilled - baseline) / (teacher - baseline)


def _lead_kept(row: dict, base: dict | None, teacher: dict | None, pair: tuple[str, str]) -> dict[str, float | None] | None:
    if base is None or teacher is None:
        return None
    return {m: share_of_lead(row["metrics"].get(m), base["metrics"].get(m), teacher["metrics"].get(m)) for m in pair}


def _file(row: dict) -> str:
    return row.get("onnx_file") or row.get("file") or _label(row)


# Shares of the teacher's accuracy this close are equally accurate: an ONNX file's metrics differ from
# its PyTorch model's in the last digits (float rounding), which must not outweigh a 10x speedup.
ACCURACY_TIE = 1e-3


def _target(rows: list[dict], target: float, pair: tuple[str, str]) -> dict:
    """Which file to ship: among the student rows (baselines included) that keep ``target`` of the
    teacher's accuracy (both metrics of ``pair``), the fastest; of equally fast ones (the same
    student, runtime and precision: the same graph, baseline or distilled) the most accurate; of
    equally accurate ones the faster measured. When none keeps ``target``: the most accurate
    (highest smaller share), of equally accurate ones the fastest."""
    names = "/".join(METRIC_LABELS[m] for m in pair)
    rows = [r for r in rows if r["role"] != "teacher" and all((r.get("kept") or {}).get(m) is not None for m in pair)]
    if not rows:
        return {"target_accuracy": target, "met": None, "best": None, "message": "no student row has accuracy to compare with the teacher's"}

    def share(r: dict) -> float:
        return min(r["kept"][m] for m in pair)

    def latency(r: dict) -> float:
        return r["latency_ms_p50"] if r["latency_ms_p50"] is not None else math.inf

    graph: dict[tuple, float] = {}  # the same graph runs at the same speed: its rows share the fastest measurement
    for r in rows:
        key = (r.get("student"), r["runtime"], r.get("precision"))
        graph[key] = min(graph.get(key, math.inf), latency(r))

    def speed(r: dict) -> float:
        return graph[(r.get("student"), r["runtime"], r.get("precision"))]

    def kept(r: dict) -> str:
        return "/".join(f"{r['kept'][m]:.0%}" for m in pair)

    def pick(candidates: list[dict]) -> dict:  # the most accurate; of those within ACCURACY_TIE of it, the fastest
        top = max(share(r) for r in candidates)
        return min((r for r in candidates if share(r) >= top - ACCURACY_TIE), key=lambda r: (speed(r), latency(r)))

    meeting = [r for r in rows if share(r) >= target]
    if meeting:
        fastest = min(speed(r) for r in meeting)
        best = pick([r for r in meeting if speed(r) == fastest])
        message = (f"{len(meeting)} of {len(rows)} student rows keep >= {target:.0%} of the teacher's {names}; "
                   f"fastest: {_label(best)} keeps {kept(best)} at {_fmt(best['latency_ms_p50'], '.3g')} ms, "
                   f"{_timing(best.get('speedup_like_for_like'), '.2f', 'x', best.get('speedup_like_for_like_stable') is False)} like-for-like")
    else:
        best = pick(rows)
        message = (f"no student keeps {target:.0%} of the teacher's {names}; closest: {_label(best)} keeps {kept(best)} "
                   f"({_timing(best.get('speedup_like_for_like'), '.2f', 'x', best.get('speedup_like_for_like_stable') is False)} like-for-like)")
    summary = {k: best.get(k) for k in ("name", "role", "student", "runtime", "precision", "kept", "speedup")} | {"file": _file(best)}
    return {"target_accuracy": target, "met": bool(meeting), "best": summary, "message": message}


NOISE_NOTE = "one run is noisy: `distill study` gives an interval"


def _verdict(rows: list[dict], target: dict, pair: tuple[str, str]) -> dict:
    """Did distillation help each student (its gain over the student trained alone, PyTorch rows, in
    both headline metrics), and which file to ship (``target``'s pick): one plain line."""
    names = [METRIC_LABELS[m] for m in pair]
    students = []
    for spec in dict.fromkeys(r.get("student") for r in rows if r["role"] == "student"):
        row = _find(rows, "student", "torch", spec) or _find(rows, "student", None, spec)
        gain = row.get("gain")
        if not gain or any(gain.get(m) is None for m in pair):
            helped, text = None, f"no baseline was trained for {spec}, so whether distillation helped it is unknown"
        else:
            helped = "yes" if all(gain[m] > 0 for m in pair) else "no" if all(gain[m] <= 0 for m in pair) else "mixed"
            words = {"yes": "helped", "no": "did not help", "mixed": "gave a mixed result for"}[helped]
            figures = ", ".join(f"{n} {gain[m]:+.3f}" for n, m in zip(names, pair))
            text = f"distillation {words} {spec} ({figures} over the student trained alone; {NOISE_NOTE})"
        students.append({"student": spec, "gain": gain, "helped": helped, "message": text})
    ship = target.get("best")
    if ship is None:
        ship_text = "nothing to ship: no student row was scored"
    else:
        what = "ship the baseline: " if ship["role"] == "student_baseline" else "ship "
        detail = (f"{ship['name']}, {ship['runtime']} {ship['precision']}, keeps "
                  + "/".join(f"{ship['kept'][m]:.0%}" for m in pair) + f" of the teacher's {'/'.join(names)}"
                  + (f", {ship['speedup']:.1f}x the teacher's speed" if ship.get("speedup") else ""))
        ship_text = f"{what}{ship['file']} ({detail}" + ("" if target["met"] else f"; the closest to the {target['target_accuracy']:.0%} target") + ")"
    message = "; ".join([s["message"] for s in students] + [ship_text])
    return {"students": students, "ship": ship, "message": message}


def report_row(
    name: str, role: str, student: str | None, bench: dict, size: tuple[int | None, float | None], metrics: dict,
    onnx: dict | None = None, file: str | os.PathLike | None = None,
) -> dict:
    """One model entry for :func:`build_report`: who it is (``name``, ``role``, the ``student`` spec),
    its speed (``bench``: a ``benchmark_torch``/``benchmark_onnx`` result), its size (``(params,
    gflops)``) and test ``metrics``. An ONNX artefact passes ``export_onnx``'s info as ``onnx``: its
    precision, file and largest difference from PyTorch go into the row; a PyTorch model is fp32
    and may name its model ``file`` (what the verdict says to ship)."""
    row = {"name": name, "role": role, "student": student, "precision": onnx["precision"] if onnx else "fp32", **bench,
           "params": size[0], "gflops": size[1], "metrics": metrics}
    row |= {"file": str(file)} if file is not None and not onnx else {}
    return row | ({"onnx_file": onnx["path"], "max_abs_diff": onnx["max_abs_diff"]} if onnx else {})


def build_report(
    models: list[dict], config: dict, onnx_info: dict, protocol: str = "retrieval", target_accuracy: float = 0.9,
    machine: dict | None = None,
) -> dict:
    """Assemble the report dict (the ``report.json`` schema) from per-model benchmark/metric entries.

    Each entry needs ``name`` and ``runtime`` (torch | onnxruntime), and ``role`` (teacher |
    student_baseline | student; default: the name) when the name is not a role; optional ``student``
    (the spec, pairs a distilled student with its baseline), ``precision`` (default fp32), ``provider``.
    Missing numbers and metrics become ``None``; extra keys (p99, onnx file, parity, ...) are kept.
    Each row gets ``speedup`` (teacher PyTorch p50 / its p50), ``speedup_like_for_like`` (teacher p50
    in the same runtime, fp32 / its p50), ``kept`` (share of the teacher's accuracy), ``drop``,
    ``gain`` (vs the PyTorch baseline of the same student), ``lead_kept`` (distilled students: the
    share of the teacher's lead over that baseline kept, :func:`share_of_lead`) and ``pareto``. The
    top-level speedups, drop, gain and ``share_of_lead_kept`` are those of the first distilled
    student, as with one student; ``target`` names the file to ship and ``verdict`` says in one line
    whether distillation helped and what to ship.
    """
    rows = []
    for entry in models:
        role = entry.get("role") or entry.get("name")
        precision = entry.get("precision") or "fp32"
        if role not in MODEL_NAMES or entry.get("runtime") not in RUNTIMES or precision not in PRECISIONS:
            raise DistillError(
                f"report entry needs name (or role) in {MODEL_NAMES}, runtime in {RUNTIMES} and precision in {PRECISIONS}, "
                f"got name={entry.get('name')!r}, runtime={entry.get('runtime')!r}, precision={precision!r}"
            )
        metrics = dict(entry.get("metrics") or {})
        row = {k: entry.get(k) for k in MODEL_KEYS} | {"role": role, "student": entry.get("student"), "precision": precision,
                                                       "provider": entry.get("provider")}
        row |= {k: v for k, v in entry.items() if k not in row}
        row["metrics"] = {k: metrics.get(k) for k in METRICS} | {k: v for k, v in metrics.items() if k not in METRICS}
        rows.append(_jsonable(row))

    pair = accuracy_metrics(protocol)
    teacher = _find(rows, "teacher", "torch") or _find(rows, "teacher")
    t_p50 = {rt: (_find(rows, "teacher", rt) or {}).get("latency_ms_p50") for rt in RUNTIMES}
    for row in rows:
        row["speedup"] = _ratio(t_p50["torch"], row["latency_ms_p50"])
        row["speedup_like_for_like"] = _ratio(t_p50[row["runtime"]], row["latency_ms_p50"])
        row["speedup_stable"] = not _unstable(row, _find(rows, "teacher", "torch"))  # False: a "?" where it is shown
        row["speedup_like_for_like_stable"] = not _unstable(row, _find(rows, "teacher", row["runtime"]))
        tm = teacher["metrics"] if teacher else {}
        row["kept"] = {m: _ratio(row["metrics"][m], tm.get(m)) if row["metrics"][m] is not None else None for m in pair}
        row["drop"] = _metric_diff(teacher, row, pair) if row["role"] != "teacher" else None
        base = _find(rows, "student_baseline", "torch", row["student"]) if row["role"] == "student" else None
        row["gain"] = _metric_diff(row, base, pair)
        row["lead_kept"] = _lead_kept(row, base, teacher, pair) if row["role"] == "student" else None
    front = pareto_front([(r["latency_ms_p50"], r["metrics"].get(pareto_metric(protocol))) for r in rows])
    for row, on in zip(rows, front):
        row["pareto"] = on

    lead = _find(rows, "student")
    lead_spec = lead.get("student") if lead else None

    def p50(role: str, runtime: str) -> float | None:
        row = _find(rows, role, runtime, lead_spec if role == "student" else None)
        return row["latency_ms_p50"] if row else None

    report = {
        "models": rows,
        "speedup": _ratio(p50("teacher", "torch"), p50("student", "onnxruntime")),
        "speedup_like_for_like": {rt: _ratio(p50("teacher", rt), p50("student", rt)) for rt in RUNTIMES},
        "onnx": _jsonable(dict(onnx_info or {})),
        "config": _jsonable(dict(config or {})),
        "protocol": protocol,
        "accuracy_metrics": list(pair),
        "pareto_metric": pareto_metric(protocol),
        "target": _target(rows, target_accuracy, pair),
    }
    if machine is not None:
        report["machine"] = _jsonable(machine)
    student = _find(rows, "student", "torch", lead_spec) or lead
    if (drop := _metric_diff(_find(rows, "teacher"), student)) is not None:
        report["accuracy_drop"] = drop
    if (gain := _metric_diff(student, _find(rows, "student_baseline", None, lead_spec))) is not None:
        report["distillation_gain"] = gain
        report["share_of_lead_kept"] = student.get("lead_kept")
    report["verdict"] = _verdict(rows, report["target"], pair)
    return report


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def legend(report: dict) -> str:
    """The table's caption: what each column means, and on re-ID data which metric drop/gain/kept use and why."""
    pair = report.get("accuracy_metrics") or ["recall@1", "map"]
    names = "/".join(METRIC_LABELS[m] for m in pair)
    text = (
        "latency at batch 1, throughput at the largest batch; speedup = teacher (PyTorch) p50 / this row's p50; "
        "like-for-like (l-f-l) = teacher p50 in the same runtime (fp32) / this row's p50; "
        f"kept = this row / teacher (PyTorch), drop = teacher - this row, gain = distilled student - its baseline "
        f"(PyTorch), lead kept = gain / (teacher - baseline), the share of the teacher's lead kept ('-' when the "
        f"teacher does not lead), each for {names}; front = on the Pareto front of latency vs "
        f"{METRIC_LABELS[report.get('pareto_metric') or 'recall@1']}"
    )
    text += "; " + UNSTABLE_NOTE if _unstable(*report.get("models") or []) else ""
    note = protocol_named(report.get("protocol")).note if report.get("protocol") in PROTOCOLS else None
    return text + ("; " + note if note else "")


def _rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the one table shared by the console and Markdown."""
    names = "/".join(METRIC_LABELS[m] for m in report.get("accuracy_metrics") or ["recall@1", "map"])
    header = ["model", "runtime", "precision", "params M", "GFLOPs", "p50 ms", "p90 ms", "img/s", "speedup", "l-f-l",
              "R@1", "mAP", "rank-1", "NMI", f"kept {names}", f"drop {names}", f"gain {names}", f"lead kept {names}", "front"]  # console headers wrap at spaces

    def pair(d: dict | None, spec: str, scale: float = 1.0) -> str:
        return "-" if not d else "/".join(_fmt(v * scale if v is not None else None, spec) for v in d.values())

    cells = []
    for m in report["models"]:
        met = m["metrics"]
        params = m["params"] / 1e6 if m["params"] is not None else None
        where = m.get("provider") or m.get("device")
        runtime = f"{m['runtime']}:{where.removesuffix('ExecutionProvider')}" if where else m["runtime"]
        cells.append([
            m["name"], runtime, m.get("precision") or "fp32", _fmt(params, ".3g"), _fmt(m["gflops"], ".3g"),
            *(_timing(m[k], spec, "", _unstable(m)) for k, spec in (("latency_ms_p50", ".3g"), ("latency_ms_p90", ".3g"), ("throughput_ips", ".0f"))),
            *(_timing(m.get(k), ".2f", "x", _unstable(m) or m.get(f"{k}_stable") is False) for k in ("speedup", "speedup_like_for_like")),
            *(_fmt(met.get(k), ".3f") for k in ("recall@1", "map", "rank1", "nmi")),
            pair(m.get("kept"), ".0f", 100), pair(m.get("drop"), "+.3f"), pair(m.get("gain"), "+.3f"),
            pair(m.get("lead_kept"), ".0f", 100), "*" if m.get("pareto") else "",
        ])
    return header, cells


def speedup_lines(report: dict) -> list[str]:
    """The two speedups in words: like-for-like per runtime, and deployment (first distilled student)."""
    like = report["speedup_like_for_like"]
    rows = [m for m in report.get("models") or [] if isinstance(m, dict) and "runtime" in m]
    lead = _find(rows, "student")
    spec = lead.get("student") if lead else None

    def unstable(teacher_runtime: str, student_runtime: str) -> bool:
        return _unstable(_find(rows, "teacher", teacher_runtime), _find(rows, "student", student_runtime, spec))

    lines = [
        "like-for-like speedup (same runtime, architecture only): "
        f"PyTorch {_timing(like.get('torch'), '.2f', 'x', unstable('torch', 'torch'))}, "
        f"ONNX Runtime {_timing(like.get('onnxruntime'), '.2f', 'x', unstable('onnxruntime', 'onnxruntime'))}",
        "deployment speedup (teacher in PyTorch eager -> student in ONNX Runtime): "
        + _timing(report["speedup"], ".2f", "x", unstable("torch", "onnxruntime")),
    ]
    return lines + ([UNSTABLE_NOTE] if any(UNSTABLE in line for line in lines) else [])


def gate_line(gate: dict) -> str:
    """One sentence on the teacher-quality gate recorded in a report."""
    if gate["verdict"] == "skipped":
        return "skipped (no validation split or no baseline student)"
    return (
        f"validation {gate['metric']} teacher {gate['teacher']:.3f} vs student alone {gate['baseline']:.3f}, "
        f"margin {gate['margin']:.2f}: {'clearly better' if gate['verdict'] == 'better' else 'NOT clearly better'}"
    )


def layer_line(choice: dict) -> str:
    """One sentence on the teacher layer ``--teacher-layer auto`` chose (``report['teacher_layer']``)."""
    scores = ", ".join(f"{name} {value:.3f}" for name, value in choice["scores"].items())
    return f"{choice['chosen']}, the best on validation {choice['metric']} ({scores})"


def _lead_text(lead: dict) -> str:
    return "/".join(_fmt(v * 100 if v is not None else None, ".0f", "%") for v in lead.values())


def selection_lines(report: dict) -> list[str]:
    """One line per model trained with validation: the epoch kept and its score, the last epoch's
    score and the chance level (``report['selection']``)."""
    lines = []
    for name, fit in (report.get("selection") or {}).items():
        chance = f", a random ranking {fit['chance']:.3f}" if fit.get("chance") is not None else ""
        lines.append(f"{name}: kept epoch {fit['best_epoch']} of {fit.get('epochs', '?')} ({fit['best_score']:.3f}), "
                     f"last epoch {fit['last_score']:.3f}, highest {fit['top_score']:.3f} at epoch {fit['top_epoch']}{chance}"
                     + (" [NEAR CHANCE]" if fit.get("near_chance") else ""))
    return lines


def _metric_of_selection(report: dict) -> str:
    return next((fit.get("metric") for fit in (report.get("selection") or {}).values() if fit.get("metric")), "validation score")


NO_TEST_SET = "no test set: the students learnt from unlabeled images alone and nothing measured their accuracy (give --data)"


def no_test_set(report: dict) -> bool:
    """True for a run without a test set (``test_set`` recorded as None): speed and size only."""
    return "test_set" in report and report["test_set"] is None


def to_markdown(report: dict) -> str:
    header, cells = _rows(report)
    lines = ["# distill report", ""]
    if report.get("verdict"):
        lines += [f"**Verdict**: {report['verdict']['message']}", ""]
    lines += [f"**Warning**: {w}" for w in report.get("warnings") or []] + ([""] if report.get("warnings") else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    lines += ["", legend(report)] + (["", f"**{NO_TEST_SET}**"] if no_test_set(report) else [])
    if report.get("share_of_lead_kept"):
        names = "/".join(METRIC_LABELS[m] for m in report.get("accuracy_metrics") or ["recall@1", "map"])
        lines += ["", f"**Share of the teacher's lead kept** ({names}): {_lead_text(report['share_of_lead_kept'])}"]
    if report.get("target"):
        lines += ["", f"**Target**: {report['target']['message']}"]
    if report.get("selection"):
        lines += ["", f"## Model selection (validation {_metric_of_selection(report)})", ""]
        lines += [f"- {line}" for line in selection_lines(report)]
    if report.get("teacher_gate"):
        lines += ["", f"**Teacher gate**: {gate_line(report['teacher_gate'])}"]
    if report.get("teacher_layer"):
        lines += ["", f"**Teacher embedding**: {layer_line(report['teacher_layer'])}"]
    lines += ["", "## Speedup", ""] + [f"- {line}" for line in speedup_lines(report)]
    onnx_info = report.get("onnx") or {}
    if onnx_info:
        lines += ["", "## ONNX", "", f"- file: `{onnx_info.get('path')}` ({onnx_info.get('precision', 'fp32')}, opset {onnx_info.get('opset')})",
                  f"- max abs diff vs PyTorch (L2-normalised embeddings): {_fmt(onnx_info.get('max_abs_diff'), '.2e')}"]
        lines += [f"- `{m['onnx_file']}` ({m.get('precision')}): max abs diff {_fmt(m.get('max_abs_diff'), '.2e')}"
                  for m in report["models"] if m.get("onnx_file") and m.get("onnx_file") != onnx_info.get("path")]
    if report.get("machine"):
        lines += ["", "## Machine", "", "```json", json.dumps(report["machine"], indent=2, sort_keys=True), "```"]
    lines += ["", "## Config", "", "```json", json.dumps(report.get("config", {}), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


MARKERS = {("torch", "fp32"): "o", ("onnxruntime", "fp32"): "s", ("onnxruntime", "fp16"): "^",
           ("onnxruntime", "int8"): "D", ("onnxruntime", "int8-static"): "v"}


def speed_accuracy_figure(report: dict):
    """Latency (log x) vs the Pareto metric: one marker per row (colour = model, shape = runtime and
    precision, hollow = baseline, black = teacher), every row named in a legend outside the axes (so
    no label covers a point or another label), the Pareto front as a dashed step line, the teacher's
    accuracy and the target share of it as horizontal lines."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    metric = report.get("pareto_metric") or "recall@1"
    fig = Figure(figsize=(10, 5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    rows = [m for m in report["models"] if m["latency_ms_p50"] and m["latency_ms_p50"] > 0 and m["metrics"].get(metric) is not None]
    specs = list(dict.fromkeys(m.get("student") for m in rows if m.get("role", m["name"]) != "teacher"))
    for m in rows:
        role = m.get("role", m["name"])
        colour = "black" if role == "teacher" else f"C{specs.index(m.get('student')) % 10}"
        marker = MARKERS.get((m["runtime"], m.get("precision") or "fp32"), "P")
        ax.scatter([m["latency_ms_p50"]], [m["metrics"][metric]], marker=marker, s=90 if role == "teacher" else 50, zorder=3,
                   facecolors="none" if role == "student_baseline" else colour, edgecolors=colour, linewidths=1.5,
                   label=f"{m['name']} · {m['runtime']} {m.get('precision') or 'fp32'}")
    front = sorted((m["latency_ms_p50"], m["metrics"][metric]) for m in rows if m.get("pareto"))
    if front:
        ax.step(*zip(*front), where="post", ls="--", lw=1, color="gray", zorder=2, label="Pareto front")
    teacher = _find(rows, "teacher", "torch") or _find(rows, "teacher")
    target = (report.get("target") or {}).get("target_accuracy")
    if teacher:
        ax.axhline(teacher["metrics"][metric], color="black", lw=0.8, ls=":", label=f"teacher {METRIC_LABELS[metric]}")
        if target:
            ax.axhline(target * teacher["metrics"][metric], color="firebrick", lw=0.8, ls="-.", label=f"{target:.0%} of teacher")
    if rows:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels on a log axis overlap
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=7, frameon=False)
    else:
        ax.text(0.5, 0.5, "no latency/accuracy pairs to plot", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("latency p50, batch 1 (ms, log scale)")
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.set_title(f"speed vs accuracy ({METRIC_LABELS[metric]}; filled = distilled, hollow = baseline, black = teacher)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_png(report: dict) -> bytes:
    """:func:`speed_accuracy_figure` as PNG bytes (Agg, no pyplot: no global backend switch, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = speed_accuracy_figure(report)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``speed_vs_accuracy.png`` atomically into ``out_dir``."""
    out = Path(out_dir)
    return {
        "json": atomic_write_text(out / "report.json", json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n"),
        "md": atomic_write_text(out / "report.md", to_markdown(report)),
        "png": atomic_write_bytes(out / "speed_vs_accuracy.png", plot_png(report)),
    }


def _table(header: list[str], cells: list[list[str]], columns: list[int], **kwargs) -> Table:
    table = Table(box=box.SIMPLE_HEAD, padding=0, **kwargs)  # columns one space apart
    for i in columns:
        table.add_column(header[i].replace(" ", "\n"), no_wrap=True, justify="left" if i < 3 else "right")
    for row in cells:
        table.add_row(*(Text(row[i]) for i in columns))  # plain text: a model name is never markup
    return table


def print_report(report: dict, console: Console | None = None) -> None:
    """The report table, both speedups and the target verdict on the console; a console too narrow for
    the one table (rich would cut its numbers to "…") gets it in parts that fit, each repeating the
    model, runtime and precision columns."""
    console = console or make_console()
    header, cells = _rows(report)
    title, caption = "distill: speed vs accuracy", legend(report)

    def widths() -> list[int]:
        return [max(*(len(w) for w in h.split()), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]

    if sum(widths()) + len(header) + 1 <= console.width:
        console.print(_table(header, cells, list(range(len(header))), title=title, caption=Text(caption)))
    else:
        cells = [[r[0], r[1].replace("onnxruntime", "ort"), *r[2:]] for r in cells]
        w, keys, parts = widths(), [0, 1, 2], [[]]
        for i in range(len(keys), len(header)):
            if parts[-1] and sum(w[j] + 1 for j in (*keys, *parts[-1], i)) + 1 > console.width:
                parts.append([])
            parts[-1].append(i)
        for n, part in enumerate(parts):
            last = n == len(parts) - 1
            console.print(_table(header, cells, keys + part, title=title if n == 0 else None,
                                 caption=Text(f"ort = ONNX Runtime; {caption}") if last else None))
    lines = [NO_TEST_SET] if no_test_set(report) else []
    lines += speedup_lines(report) + ([report["target"]["message"]] if report.get("target") else [])
    if report.get("share_of_lead_kept"):
        names = "/".join(METRIC_LABELS[m] for m in report.get("accuracy_metrics") or ["recall@1", "map"])
        lines.append(f"share of the teacher's lead kept ({names}): {_lead_text(report['share_of_lead_kept'])}")
    lines += [f"teacher gate: {gate_line(report['teacher_gate'])}"] if report.get("teacher_gate") else []
    lines += [f"teacher embedding: {report['teacher_layer']['chosen']}"] if report.get("teacher_layer") else []
    lines += [f"model selection: {line}" for line in selection_lines(report)]
    for line in lines:
        console.print(line, highlight=False, markup=False)
    for warning in report.get("warnings") or []:
        console.print(Text.assemble(("warning: ", "yellow"), warning))
    if report.get("verdict"):
        console.print(Text.assemble(("verdict: ", "bold"), report["verdict"]["message"]))


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
            isinstance(gate.get("metric"), str) and all(_numbers(gate.get(k)) and gate.get(k) is not None for k in ("teacher", "baseline", "margin"))))):
        return f"'teacher_gate' must be an object with metric, teacher, baseline, margin and verdict, got {gate!r}"
    if layer is not None and not (isinstance(layer, dict) and isinstance(layer.get("chosen"), str)):
        return f"'teacher_layer' must be an object with the chosen layer, got {layer!r}"
    return None
