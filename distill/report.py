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
from distill.errors import DistillError

MODEL_NAMES = ("teacher", "student_baseline", "student")  # a row's role
RUNTIMES = ("torch", "onnxruntime")
PRECISIONS = ("fp32", "fp16", "int8", "int8-static")
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map", "rank1")
MODEL_KEYS = ("name", "runtime", "params", "gflops", "latency_ms_p50", "latency_ms_p90", "throughput_ips")
METRIC_LABELS = {"recall@1": "R@1", "map": "mAP", "rank1": "rank-1"}
REID_NOTE = (
    "re-ID data: drop, gain and kept use rank-1 (each query searched in the gallery with its same-camera "
    "matches removed, the Market-1501 protocol), not R@1 (query and gallery pooled, no camera filter), "
    "because same-camera near-duplicates make pooled R@1 easy for every model"
)


def accuracy_metrics(protocol: str) -> tuple[str, str]:
    """The two metrics of the drop/gain/kept columns: rank-1 and mAP on re-ID data, else Recall@1 and mAP."""
    return ("rank1", "map") if protocol == "reid" else ("recall@1", "map")


def pareto_metric(protocol: str) -> str:
    """The accuracy axis of the Pareto front and the plot: mAP on re-ID data, else Recall@1."""
    return "map" if protocol == "reid" else "recall@1"


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


def _metric_diff(a: dict | None, b: dict | None, keys=None) -> dict[str, float] | None:
    """``a - b`` for every metric (or those in ``keys``) both have a number for (``None`` when either model is missing)."""
    if a is None or b is None:
        return None
    return {k: a["metrics"][k] - b["metrics"][k] for k in (keys or a["metrics"])
            if a["metrics"].get(k) is not None and b["metrics"].get(k) is not None}


def _label(row: dict) -> str:
    return f"{row['name']} ({row['runtime']} {row.get('precision') or 'fp32'})"


def _target(rows: list[dict], target: float, pair: tuple[str, str]) -> dict:
    """Does any student row keep ``target`` of the teacher's accuracy (both metrics of ``pair``)? The
    fastest that does, else the one that comes closest (highest smaller share)."""
    names = "/".join(METRIC_LABELS[m] for m in pair)
    rows = [r for r in rows if r["role"] != "teacher" and all((r.get("kept") or {}).get(m) is not None for m in pair)]
    if not rows:
        return {"target_accuracy": target, "met": None, "best": None, "message": "no student row has accuracy to compare with the teacher's"}

    def share(r: dict) -> float:
        return min(r["kept"][m] for m in pair)

    def kept(r: dict) -> str:
        return "/".join(f"{r['kept'][m]:.0%}" for m in pair)

    meeting = [r for r in rows if share(r) >= target]
    if meeting:
        best = min(meeting, key=lambda r: r["latency_ms_p50"] if r["latency_ms_p50"] is not None else math.inf)
        message = (f"{len(meeting)} of {len(rows)} student rows keep >= {target:.0%} of the teacher's {names}; "
                   f"fastest: {_label(best)} keeps {kept(best)} at {_fmt(best['latency_ms_p50'], '.3g')} ms, "
                   f"{_fmt(best.get('speedup_like_for_like'), '.2f', 'x')} like-for-like")
    else:
        best = max(rows, key=share)
        message = (f"no student keeps {target:.0%} of the teacher's {names}; closest: {_label(best)} keeps {kept(best)} "
                   f"({_fmt(best.get('speedup_like_for_like'), '.2f', 'x')} like-for-like)")
    summary = {k: best.get(k) for k in ("name", "runtime", "precision", "kept")}
    return {"target_accuracy": target, "met": bool(meeting), "best": summary, "message": message}


def report_row(
    name: str, role: str, student: str | None, bench: dict, size: tuple[int | None, float | None], metrics: dict,
    onnx: dict | None = None,
) -> dict:
    """One model entry for :func:`build_report`: who it is (``name``, ``role``, the ``student`` spec),
    its speed (``bench``: a ``benchmark_torch``/``benchmark_onnx`` result), its size (``(params,
    gflops)``) and test ``metrics``. An ONNX artefact passes ``export_onnx``'s info as ``onnx``: its
    precision, file and largest difference from PyTorch go into the row; a PyTorch model is fp32."""
    row = {"name": name, "role": role, "student": student, "precision": onnx["precision"] if onnx else "fp32", **bench,
           "params": size[0], "gflops": size[1], "metrics": metrics}
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
    ``gain`` (vs the PyTorch baseline of the same student) and ``pareto``. The top-level speedups,
    drop and gain are those of the first distilled student, as with one student.
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
        tm = teacher["metrics"] if teacher else {}
        row["kept"] = {m: _ratio(row["metrics"][m], tm.get(m)) if row["metrics"][m] is not None else None for m in pair}
        row["drop"] = _metric_diff(teacher, row, pair) if row["role"] != "teacher" else None
        base = _find(rows, "student_baseline", "torch", row["student"]) if row["role"] == "student" else None
        row["gain"] = _metric_diff(row, base, pair)
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
        f"(PyTorch), each for {names}; front = on the Pareto front of latency vs "
        f"{METRIC_LABELS[report.get('pareto_metric') or 'recall@1']}"
    )
    return text + ("; " + REID_NOTE if report.get("protocol") == "reid" else "")


def _rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the one table shared by the console and Markdown."""
    names = "/".join(METRIC_LABELS[m] for m in report.get("accuracy_metrics") or ["recall@1", "map"])
    header = ["model", "runtime", "precision", "params M", "GFLOPs", "p50 ms", "p90 ms", "img/s", "speedup", "l-f-l",
              "R@1", "mAP", "rank-1", "NMI", f"kept {names}", f"drop {names}", f"gain {names}", "front"]  # console headers wrap at spaces

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
            _fmt(m["latency_ms_p50"], ".3g"), _fmt(m["latency_ms_p90"], ".3g"), _fmt(m["throughput_ips"], ".0f"),
            _fmt(m.get("speedup"), ".2f", "x"), _fmt(m.get("speedup_like_for_like"), ".2f", "x"),
            *(_fmt(met.get(k), ".3f") for k in ("recall@1", "map", "rank1", "nmi")),
            pair(m.get("kept"), ".0f", 100), pair(m.get("drop"), "+.3f"), pair(m.get("gain"), "+.3f"),
            "*" if m.get("pareto") else "",
        ])
    return header, cells


def speedup_lines(report: dict) -> list[str]:
    """The two speedups in words: like-for-like per runtime, and deployment (first distilled student)."""
    like = report["speedup_like_for_like"]
    return [
        "like-for-like speedup (same runtime, architecture only): "
        f"PyTorch {_fmt(like.get('torch'), '.2f', 'x')}, ONNX Runtime {_fmt(like.get('onnxruntime'), '.2f', 'x')}",
        "deployment speedup (teacher in PyTorch eager -> student in ONNX Runtime): " + _fmt(report["speedup"], ".2f", "x"),
    ]


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


def to_markdown(report: dict) -> str:
    header, cells = _rows(report)
    lines = ["# distill report", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    lines += ["", legend(report)]
    if report.get("target"):
        lines += ["", f"**Target**: {report['target']['message']}"]
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
    console = console or Console()
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
    lines = speedup_lines(report) + ([report["target"]["message"]] if report.get("target") else [])
    lines += [f"teacher gate: {gate_line(report['teacher_gate'])}"] if report.get("teacher_gate") else []
    lines += [f"teacher embedding: {report['teacher_layer']['chosen']}"] if report.get("teacher_layer") else []
    for line in lines:
        console.print(line, highlight=False, markup=False)


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
