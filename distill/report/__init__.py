"""The speed-versus-accuracy report: one table (rich), ``report.json``, ``report.md`` and a PNG plot.

Speedup is always shown two ways, never only the flattering one:
- **deployment**: teacher as users run it today (PyTorch eager) vs the exported student in ONNX
  Runtime, ``teacher torch p50 / student onnxruntime p50`` (runtime and architecture together);
- **like-for-like**: teacher and student in the same runtime, ``teacher p50 / student p50`` per runtime
  (the architecture alone).

:mod:`~distill.report.build` makes the report dict, :mod:`~distill.report.text` the table and the
words (console, Markdown), :mod:`~distill.report.plot` the plot, :mod:`~distill.report.files` writes
them and reads ``report.json`` back. None of them imports torch: ``distill report`` re-prints a saved
report without it.
"""

from distill.report.build import (
    METRIC_LABELS, METRICS, MODEL_KEYS, MODEL_NAMES, PRECISIONS, REID_NOTE, RUNTIMES, accuracy_metrics, build_report,
    pareto_front, pareto_metric, report_row, share_of_lead,
)
from distill.report.files import load_report, report_problem, write_report
from distill.report.plot import plot_png, speed_accuracy_figure
from distill.report.text import (
    NO_TEST_SET, gate_line, layer_line, legend, no_test_set, print_report, selection_lines, speedup_lines, to_markdown,
)

__all__ = [
    "METRIC_LABELS", "METRICS", "MODEL_KEYS", "MODEL_NAMES", "NO_TEST_SET", "PRECISIONS", "REID_NOTE", "RUNTIMES",
    "accuracy_metrics", "build_report", "gate_line", "layer_line", "legend", "load_report", "no_test_set", "pareto_front",
    "pareto_metric", "plot_png", "print_report", "report_problem", "report_row", "selection_lines", "share_of_lead",
    "speed_accuracy_figure", "speedup_lines", "to_markdown", "write_report",
]
