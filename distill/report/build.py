"""The report dict (the ``report.json`` schema): one row per (model, runtime, precision) with both
speedups, the share of the teacher's accuracy kept, drop, gain over the student trained alone and
the share of the teacher's lead kept, the Pareto front, which file to ship (``target``) and the
verdict in words.
"""

from __future__ import annotations

import math
import os

from distill.config import PRECISIONS
from distill.errors import DistillError
from distill.headlines import HEADLINE, NOTE, PARETO_METRIC, REID

MODEL_NAMES = ("teacher", "student_baseline", "student")  # a row's role
RUNTIMES = ("torch", "onnxruntime")
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map", "rank1")
MODEL_KEYS = ("name", "runtime", "params", "gflops", "latency_ms_p50", "latency_ms_p90", "throughput_ips")
METRIC_LABELS = {"recall@1": "R@1", "map": "mAP", "rank1": "rank-1"}
REID_NOTE = NOTE[REID]


def accuracy_metrics(protocol: str) -> tuple[str, str]:
    """The two metrics of the drop/gain/kept columns: the protocol's headline (re-ID: rank-1 and mAP;
    retrieval: Recall@1 and mAP)."""
    return HEADLINE[protocol or "retrieval"]


def pareto_metric(protocol: str) -> str:
    """The accuracy axis of the Pareto front and the plot: the protocol's (re-ID: mAP; retrieval: Recall@1)."""
    return PARETO_METRIC[protocol or "retrieval"]


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


def percent_beside(value: float, target: float) -> str:
    """``value`` as a percentage next to a ``target`` share: whole percent, with as many decimals as
    it takes (up to 3) not to look like the target from the wrong side (89.6 % is not "90 %")."""
    for decimals in range(4):
        text = f"{value:.{decimals}%}"
        if value >= target or text != f"{target:.{decimals}%}":
            return text
    return f"just under {target:.0%}"


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
        return "/".join(percent_beside(r["kept"][m], target) for m in pair)

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



def _row(entry: dict) -> dict:
    """The row of one model entry: the known keys first (missing numbers None), then the entry's
    other keys; every metric of ``METRICS`` (None when missing) first in ``metrics``."""
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
    return _jsonable(row)


def _compared(rows: list[dict], pair: tuple[str, str], front_metric: str) -> list[dict]:
    """Each row with its speedups (and whether their timings were stable), ``kept``, ``drop``,
    ``gain``, ``lead_kept`` (for ``pair``) and ``pareto`` (on the front of latency vs ``front_metric``)."""
    teacher = _find(rows, "teacher", "torch") or _find(rows, "teacher")
    t_p50 = {rt: (_find(rows, "teacher", rt) or {}).get("latency_ms_p50") for rt in RUNTIMES}
    tm = teacher["metrics"] if teacher else {}
    compared = []
    for row in rows:
        base = _find(rows, "student_baseline", "torch", row["student"]) if row["role"] == "student" else None
        compared.append(row | {
            "speedup": _ratio(t_p50["torch"], row["latency_ms_p50"]),
            "speedup_like_for_like": _ratio(t_p50[row["runtime"]], row["latency_ms_p50"]),
            "speedup_stable": not _unstable(row, _find(rows, "teacher", "torch")),  # False: a "?" where it is shown
            "speedup_like_for_like_stable": not _unstable(row, _find(rows, "teacher", row["runtime"])),
            "kept": {m: _ratio(row["metrics"][m], tm.get(m)) if row["metrics"][m] is not None else None for m in pair},
            "drop": _metric_diff(teacher, row, pair) if row["role"] != "teacher" else None,
            "gain": _metric_diff(row, base, pair),
            "lead_kept": _lead_kept(row, base, teacher, pair) if row["role"] == "student" else None,
        })
    front = pareto_front([(r["latency_ms_p50"], r["metrics"].get(front_metric)) for r in compared])
    return [row | {"pareto": on} for row, on in zip(compared, front)]


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
    rows = [_row(entry) for entry in models]
    pair = accuracy_metrics(protocol)
    rows = _compared(rows, pair, pareto_metric(protocol))
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
