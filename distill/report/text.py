"""The report in words: the one table (console and Markdown) with its legend, both speedups, the
target, the teacher gate and layer, model selection, warnings and the verdict; ``report.md``."""

from __future__ import annotations

import json

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from distill.console import make_console
from distill.headlines import NOTE
from distill.report.build import METRIC_LABELS, UNSTABLE, UNSTABLE_NOTE, _find, _fmt, _timing, _unstable


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
    note = NOTE.get(report.get("protocol"))
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


def retry_note(fit: dict) -> str | None:
    """The sentence of a training repeated at a lower learning rate (``fit['retry']``), else None."""
    retry = fit.get("retry")
    if not retry:
        return None
    first = retry["first"]
    untrained = f", untrained {first['untrained_score']:.3f}" if first.get("untrained_score") is not None else ""
    return (f"trained again from the start at lr {retry['lr']:g}: at lr {retry['first_lr']:g} it had not learnt "
            f"(kept {first['best_score']:.3f}{untrained})")


def selection_lines(report: dict) -> list[str]:
    """One line per model trained with validation: the epoch kept and its score, the last epoch's
    score, the chance level and, for a student trained again, why (``report['selection']``)."""
    lines = []
    for name, fit in (report.get("selection") or {}).items():
        chance = f", a random ranking {fit['chance']:.3f}" if fit.get("chance") is not None else ""
        untrained = f", untrained {fit['untrained_score']:.3f}" if fit.get("untrained_score") is not None else ""
        flag = " [NEAR CHANCE]" if fit.get("near_chance") else " [NOT LEARNT]" if fit.get("learnt") is False else ""
        lines.append(f"{name}: kept epoch {fit['best_epoch']} of {fit.get('epochs', '?')} ({fit['best_score']:.3f}), "
                     f"last epoch {fit['last_score']:.3f}, highest {fit['top_score']:.3f} at epoch {fit['top_epoch']}"
                     f"{untrained}{chance}{flag}" + (f"; {note}" if (note := retry_note(fit)) else ""))
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
    if report.get("removed_files"):
        lines += ["", f"Scored, then removed (only their rows are needed; `--keep-comparison-files` keeps them): "
                  f"{', '.join(f'`{name}`' for name in report['removed_files'])}"]
    if report.get("machine"):
        lines += ["", "## Machine", "", "```json", json.dumps(report["machine"], indent=2, sort_keys=True), "```"]
    lines += ["", "## Config", "", "```json", json.dumps(report.get("config", {}), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


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
