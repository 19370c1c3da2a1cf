"""The teacher gate: is the teacher clearly better than the student trained alone?"""

from __future__ import annotations

import torch
from torch import nn

from distill.config import Config
from distill.console import make_console
from distill.data.prepare import Prepared
from distill.errors import DistillError
from distill.teachers import Teacher

console = make_console(stderr=True)


def teacher_gate(cfg: Config, teacher: Teacher, baseline: nn.Module | None, data: Prepared, device: torch.device) -> dict:
    """Compare the teacher and the ``baseline`` student on the validation identities (never the test
    set) by the validation score (``Protocol.distractor_map``); a warning, or with
    ``require_better_teacher`` an error (exit 1).

    Returns what ``report.json`` records as ``teacher_gate``: both scores, the metric, the margin and
    a ``verdict`` of ``better``, ``not better`` or ``skipped`` (no validation split or no baseline).
    """
    metric = data.protocol.validation_metric
    gate = {"metric": metric, "margin": cfg.gate_margin, "teacher": None, "baseline": None, "verdict": "skipped"}
    if not data.val or baseline is None:
        console.print("[yellow]teacher gate skipped[/]: it needs a validation split (--val-fraction) and the baseline student")
        return gate
    gate["teacher"] = data.protocol.distractor_map(teacher, data, device)
    gate["baseline"] = data.protocol.distractor_map(baseline, data, device)
    better = gate["teacher"] >= gate["baseline"] + cfg.gate_margin
    gate["verdict"] = "better" if better else "not better"
    line = (
        f"teacher gate: validation {metric} teacher {gate['teacher']:.3f} vs student alone {gate['baseline']:.3f} "
        f"(needs +{cfg.gate_margin:.2f})"
    )
    if better:
        console.print(f"[green]{line}: the teacher is clearly better")
        return gate
    advice = (
        "the teacher is not clearly better than the student trained alone, so distilling from it is unlikely "
        "to help: train the teacher longer (--teacher-steps, --teacher-epochs), give better weights "
        "(--teacher-weights), or check the data"
    )
    if cfg.require_better_teacher:
        raise DistillError(f"{line}; {advice} (--require-better-teacher)", exit_code=1)
    console.print(f"[yellow]warning:[/] {line}; {advice}")
    return gate
