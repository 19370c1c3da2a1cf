"""The speed-versus-accuracy plot of a report (``speed_vs_accuracy.png``), drawn with matplotlib's
Agg canvas (imported only here, when a plot is drawn)."""

from __future__ import annotations

import io

from distill.report.build import METRIC_LABELS, _find

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
