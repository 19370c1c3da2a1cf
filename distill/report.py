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

from rich import box
from rich.console import Console
from rich.table import Table

from distill.atomic import atomic_write_bytes, atomic_write_text
from distill.errors import DistillError

MODEL_NAMES = ("teacher", "student_baseline", "student")
RUNTIMES = ("torch", "onnxruntime")
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map", "rank1")
MODEL_KEYS = ("name", "runtime", "params", "gflops", "latency_ms_p50", "latency_ms_p90", "throughput_ips")
LEGEND = (
    "latency at batch 1, throughput at the largest batch; speedup = teacher (PyTorch) p50 / this row's p50; "
    "drop = teacher - model, gain = distilled student - baseline (Recall@1 / mAP)"
)


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


def _find(models: list[dict], name: str, runtime: str | None = None) -> dict | None:
    return next((m for m in models if m["name"] == name and runtime in (None, m["runtime"])), None)


def _metric_diff(a: dict | None, b: dict | None) -> dict[str, float] | None:
    """``a - b`` for every metric both have a number for (``None`` when either model is missing)."""
    if a is None or b is None:
        return None
    return {k: a["metrics"][k] - b["metrics"][k] for k in a["metrics"] if a["metrics"][k] is not None and b["metrics"].get(k) is not None}


def build_report(models: list[dict], config: dict, onnx_info: dict) -> dict:
    """Assemble the report dict (the ``report.json`` schema) from per-model benchmark/metric entries.

    Each entry needs ``name`` (teacher | student_baseline | student) and ``runtime`` (torch |
    onnxruntime); missing numbers and metrics become ``None``; extra keys (p99, provider, ...) are kept.
    """
    rows = []
    for entry in models:
        if entry.get("name") not in MODEL_NAMES or entry.get("runtime") not in RUNTIMES:
            raise DistillError(
                f"report entry needs name in {MODEL_NAMES} and runtime in {RUNTIMES}, got name={entry.get('name')!r}, runtime={entry.get('runtime')!r}"
            )
        metrics = dict(entry.get("metrics") or {})
        row = {k: entry.get(k) for k in MODEL_KEYS} | {k: v for k, v in entry.items() if k not in MODEL_KEYS}
        row["metrics"] = {k: metrics.get(k) for k in METRICS} | {k: v for k, v in metrics.items() if k not in METRICS}
        rows.append(_jsonable(row))

    def p50(name: str, runtime: str) -> float | None:
        row = _find(rows, name, runtime)
        return row["latency_ms_p50"] if row else None

    report = {
        "models": rows,
        "speedup": _ratio(p50("teacher", "torch"), p50("student", "onnxruntime")),
        "speedup_like_for_like": {rt: _ratio(p50("teacher", rt), p50("student", rt)) for rt in RUNTIMES},
        "onnx": _jsonable(dict(onnx_info or {})),
        "config": _jsonable(dict(config or {})),
    }
    teacher, student, baseline = (_find(rows, n) for n in ("teacher", "student", "student_baseline"))
    if (drop := _metric_diff(teacher, student)) is not None:
        report["accuracy_drop"] = drop
    if (gain := _metric_diff(student, baseline)) is not None:
        report["distillation_gain"] = gain
    return report


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the one table shared by the console and Markdown."""
    models = report["models"]
    t_torch = _find(models, "teacher", "torch")
    teacher, baseline = _find(models, "teacher"), _find(models, "student_baseline")
    header = ["model", "runtime", "params M", "GFLOPs", "p50 ms", "p90 ms", "img/s", "speedup", "R@1", "mAP", "rank-1", "NMI",
              "drop R@1/mAP", "gain R@1/mAP"]  # console headers wrap at spaces

    def pair(d: dict | None) -> str:
        return "-" if d is None else f"{_fmt(d.get('recall@1'), '+.3f')}/{_fmt(d.get('map'), '+.3f')}"

    cells = []
    for m in models:
        met = m["metrics"]
        params = m["params"] / 1e6 if m["params"] is not None else None
        speedup = _ratio(t_torch["latency_ms_p50"], m["latency_ms_p50"]) if t_torch else None
        drop = _metric_diff(teacher, m) if m["name"] != "teacher" else None
        gain = _metric_diff(m, baseline) if m["name"] == "student" else None
        cells.append([
            m["name"], m["runtime"], _fmt(params, ".3g"), _fmt(m["gflops"], ".3g"), _fmt(m["latency_ms_p50"], ".3g"),
            _fmt(m["latency_ms_p90"], ".3g"), _fmt(m["throughput_ips"], ".0f"), _fmt(speedup, ".2f", "x"),
            *(_fmt(met.get(k), ".3f") for k in ("recall@1", "map", "rank1", "nmi")),
            pair(drop), pair(gain),
        ])
    return header, cells


def speedup_lines(report: dict) -> list[str]:
    """The two speedups in words: like-for-like per runtime, and deployment."""
    like = report["speedup_like_for_like"]
    return [
        "like-for-like speedup (same runtime, architecture only): "
        f"PyTorch {_fmt(like.get('torch'), '.2f', 'x')}, ONNX Runtime {_fmt(like.get('onnxruntime'), '.2f', 'x')}",
        "deployment speedup (teacher in PyTorch eager -> student in ONNX Runtime): " + _fmt(report["speedup"], ".2f", "x"),
    ]


def to_markdown(report: dict) -> str:
    header, cells = _rows(report)
    lines = ["# distill report", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    lines += ["", LEGEND]
    lines += ["", "## Speedup", ""] + [f"- {line}" for line in speedup_lines(report)]
    onnx_info = report.get("onnx") or {}
    if onnx_info:
        lines += ["", "## ONNX", "", f"- file: `{onnx_info.get('path')}` ({onnx_info.get('precision', 'fp32')}, opset {onnx_info.get('opset')})",
                  f"- max abs diff vs PyTorch (L2-normalised embeddings): {_fmt(onnx_info.get('max_abs_diff'), '.2e')}"]
    lines += ["", "## Config", "", "```json", json.dumps(report.get("config", {}), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def plot_png(report: dict) -> bytes:
    """Latency (log x) vs Recall@1 (circles) and mAP (squares), one labelled point per model/runtime."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch, no display needed
    ax = fig.add_subplot()
    plotted = False
    for i, m in enumerate(report["models"]):
        x = m["latency_ms_p50"]
        if not x or x <= 0:
            continue
        for key, marker in (("recall@1", "o"), ("map", "s")):
            y = m["metrics"].get(key)
            if y is not None:
                ax.scatter([x], [y], marker=marker, s=40, color=f"C{i}")
                ax.annotate(f"{m['name']} ({m['runtime']})", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
                plotted = True
    if plotted:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels on a log axis overlap
    else:
        ax.text(0.5, 0.5, "no latency/accuracy pairs to plot", ha="center", va="center", transform=ax.transAxes)
    ax.scatter([], [], marker="o", c="gray", label="Recall@1")
    ax.scatter([], [], marker="s", c="gray", label="mAP")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("latency p50, batch 1 (ms, log scale)")
    ax.set_ylabel("accuracy")
    ax.set_title("speed vs accuracy")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
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
        table.add_column(header[i].replace(" ", "\n"), no_wrap=True, justify="left" if i < 2 else "right")
    for row in cells:
        table.add_row(*(row[i] for i in columns))
    return table


def print_report(report: dict, console: Console | None = None) -> None:
    """The report table and both speedups on the console; a console too narrow for the one table
    (rich would cut its numbers to "…") gets it as two, speed columns then accuracy columns."""
    console = console or Console()
    header, cells = _rows(report)
    widths = [max(*(len(w) for w in h.split()), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    title = "distill: speed vs accuracy"
    if sum(widths) + len(widths) + 1 <= console.width:
        console.print(_table(header, cells, list(range(len(header))), title=title, caption=LEGEND))
    else:
        cells = [[r[0], r[1].replace("onnxruntime", "ort"), *r[2:]] for r in cells]
        console.print(_table(header, cells, list(range(8)), title=title))
        console.print(_table(header, cells, [0, 1, *range(8, len(header))], caption=f"ort = ONNX Runtime; {LEGEND}"))
    for line in speedup_lines(report):
        console.print(line, highlight=False)


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
    return report
