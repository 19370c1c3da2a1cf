"""What ``distill study`` writes and shows: ``study.json``, ``study.md`` (the table and the recipes),
``study.png`` (mean ± std per recipe) and the table on the console."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from distill.atomic import atomic_write_bytes, atomic_write_text
from distill.console import make_console

TABLE_METRICS = (("recall@1", "R@1"), ("map", "mAP"), ("rank1", "rank-1"), ("nmi", "NMI"))
GAIN_METRICS = (("recall@1", "R@1"), ("map", "mAP"))


def _mean_std_cell(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.3f}" + (f" ± {stat['std']:.3f}" if stat["std"] is not None else "")


def _gain_cell(gain: dict[str, Any] | None) -> str:
    if gain is None:
        return "-"
    ci = gain["ci"]
    return f"{gain['mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci is not None else "")


def _rows(study: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the table shared by the console and Markdown."""
    header = ["recipe", "seeds", *(label for _, label in TABLE_METRICS),
              *(f"gain {label} [95% CI]" for _, label in GAIN_METRICS), "W/L/T R@1"]
    teacher = study["teacher"]
    std = teacher.get("std") or {}
    cells = [["teacher", str(len(teacher["teachers"])) if teacher.get("per_seed") else "-",
              *(_mean_std_cell({"mean": teacher["metrics"][m], "std": std.get(m)}) if m in teacher["metrics"] else "-"
                for m, _ in TABLE_METRICS),
              *("-" for _ in GAIN_METRICS), "-"]]
    for name, s in study["summary"].items():
        gain = s["gain"] or {}
        r1 = gain.get("recall@1")
        cells.append([
            name, str(s["n"]), *(_mean_std_cell(s["metrics"].get(m)) for m, _ in TABLE_METRICS),
            *(_gain_cell(gain.get(m)) for m, _ in GAIN_METRICS),
            f"{r1['wins']}/{r1['losses']}/{r1['ties']}" if r1 else "-",
        ])
    return header, cells


def legend(study: dict[str, Any]) -> str:
    """What the numbers mean; says so when one seed leaves no confidence interval."""
    text = (
        "mean ± sample std over seeds; gain = recipe - baseline on the same seed (same initialisation and batches), "
        "mean with the 95% paired-t confidence interval; W/L/T = seeds where the recipe's R@1 is above/below/equal to the baseline's"
    )
    if study["teacher"].get("per_seed"):
        text += "; one teacher per seed (--teacher-per-seed): the interval includes the teachers' training noise"
    else:
        text += ("; one teacher for every seed: the interval is the students' noise with this teacher, another "
                 "training of the teacher can move the gain (--teacher-per-seed includes it)")
    if len(study["seeds"]) == 1:
        text += ". One seed: no standard deviation and no confidence interval (use --seeds 5)"
    return text


def to_markdown(study: dict[str, Any]) -> str:
    header, cells = _rows(study)
    lines = ["# distill study", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    lines += ["", legend(study) + "."]
    lines += [f"\n**Warning**: {warning}" for warning in study.get("warnings", [])]
    lines += ["", "## Recipes", ""]
    lines += [f"- `{name}`: `{json.dumps(overrides, sort_keys=True)}`" for name, overrides in study["recipes"].items()]
    teachers = "one teacher per seed" if study["teacher"].get("per_seed") else "teacher"
    lines += ["", f"Seeds: {', '.join(map(str, study['seeds']))}; {teachers} `{study['teacher']['spec']}` ({study['teacher']['fingerprint']}).", ""]
    return "\n".join(lines)


def plot_png(study: dict[str, Any]) -> bytes:
    """Mean ± std per recipe for Recall@1 and mAP (one panel each), the teacher as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(study["summary"])
    fig = Figure(figsize=(max(6.0, 1.4 * len(names) + 2), 4.2), dpi=120)
    FigureCanvasAgg(fig)
    for i, (metric, label) in enumerate(GAIN_METRICS):
        ax = fig.add_subplot(1, 2, i + 1)
        stats_ = [study["summary"][n]["metrics"].get(metric) for n in names]
        means = [s["mean"] if s else float("nan") for s in stats_]
        stds = [(s["std"] or 0.0) if s else 0.0 for s in stats_]
        ax.errorbar(range(len(names)), means, yerr=stds, fmt="o", capsize=5, color="C0")
        t = study["teacher"]["metrics"].get(metric)
        if t is not None:
            ax.axhline(t, color="gray", linestyle="--", linewidth=1, label=f"teacher {t:.3f}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(f"{label} (mean ± std, {len(study['seeds'])} seed(s))", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_study(study: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``study.json``, ``study.md`` and ``study.png`` atomically into ``out_dir``."""
    out = Path(out_dir)
    return {
        "json": atomic_write_text(out / "study.json", json.dumps(study, indent=2, allow_nan=False) + "\n"),
        "md": atomic_write_text(out / "study.md", to_markdown(study)),
        "png": atomic_write_bytes(out / "study.png", plot_png(study)),
    }


def print_study(study: dict[str, Any], console: Console | None = None) -> None:
    """The study table on the console; a console too narrow for it (rich would cut numbers to "…")
    gets two tables, the metrics and then the gains."""
    console = console or make_console()
    header, cells = _rows(study)
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    gains = len(TABLE_METRICS) + 2
    groups = [list(range(len(header)))]
    if sum(widths) + 2 * len(widths) > console.width:
        groups = [list(range(gains)), [0, *range(gains, len(header))]]
    for i, columns in enumerate(groups):
        table = Table(box=box.SIMPLE_HEAD, title="distill study" if i == 0 else None,
                      caption=legend(study) if i == len(groups) - 1 else None)
        for c in columns:
            table.add_column(header[c], justify="left" if c == 0 else "right", no_wrap=True)
        for row in cells:
            table.add_row(*(row[c] for c in columns))
        console.print(table)
    for warning in study.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(warning)}")
