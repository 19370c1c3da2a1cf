"""The report's rows: every model of a run benchmarked, exported to ONNX and evaluated on the test
set with the artefact the row names (the PyTorch model, or each exported ONNX file run in ONNX
Runtime). Each step is a stage of the run's clock: ``benchmark|export|evaluate NAME (RUNTIME PRECISION)``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.markup import escape

from distill.bench import benchmark_onnx, benchmark_torch, count_gflops, count_params, ort_providers
from distill.console import make_console
from distill.data.prepare import Prepared, calibration_images
from distill.export import OnnxEmbedder, export_onnx
from distill.models import parse_spec
from distill.report import report_row
from distill.students.train import TrainedStudent
from distill.teachers import Teacher
from distill.timing import StageClock

console = make_console(stderr=True)


@dataclass
class Scoring:
    """What every row needs: the data (its test split), the device, the run's clock, the input size,
    the benchmark's iterations, whether to cluster (NMI/F1) and the ONNX Runtime providers."""

    data: Prepared
    device: torch.device
    clock: StageClock
    image_size: tuple[int, int]
    iters: int
    clustering: bool
    providers: list[str]

    @property
    def tested(self) -> bool:
        return bool(self.data.splits.query)

    def timed(self, what: str, name: str, runtime: str, precision: str = "fp32") -> AbstractContextManager:
        return self.clock.stage(f"{what} {name} ({runtime} {precision})")

    def bench_torch(self, model: torch.nn.Module) -> dict:
        return benchmark_torch(model, device=str(self.device), image_size=self.image_size, iters=self.iters)

    def bench_onnx(self, path: str, providers: list[str] | None = None) -> dict:
        kw = {} if providers is None else {"providers": providers}
        return benchmark_onnx(path, image_size=self.image_size, iters=self.iters, **kw)


def scoring(data: Prepared, device: torch.device, clock: StageClock, image_size: tuple[int, int], iters: int,
            clustering: bool) -> Scoring:
    """The :class:`Scoring` of a run; says so when there is no test set (the rows get no accuracy)."""
    if not data.splits.query:
        console.print("[yellow]no test set[/] (--data none): the report has speed and size, no accuracy")
    return Scoring(data, device, clock, image_size, iters, clustering, ort_providers())


def evaluated_row(s: Scoring, name: str, role: str, spec: str | None, fn: Callable, bench: dict, size: tuple,
                  onnx: dict | None = None, file: Path | None = None) -> dict:
    """The row of one artefact: its test metrics (none without a test set), speed and size."""
    precision = onnx["precision"] if onnx else "fp32"
    console.print(f"{'evaluating' if s.tested else 'benchmarking'} {escape(name)} ({bench['runtime']}, {precision})")
    with s.timed("evaluate", name, bench["runtime"], precision):
        metrics = s.data.protocol.test_metrics(fn, s.data.splits, s.data.eval_transform, s.device, s.clustering) if s.tested else {}
    return report_row(name, role, spec, bench, size, metrics, onnx, file=file)


def onnx_row(s: Scoring, name: str, role: str, spec: str | None, info: dict, size: tuple, bench: dict | None = None) -> dict:
    """The row of an exported ONNX file (``export_onnx``'s ``info``), benchmarked here unless ``bench`` is given."""
    if bench is None:
        with s.timed("benchmark", name, "onnxruntime", info["precision"]):
            bench = s.bench_onnx(info["path"], s.providers)
    return evaluated_row(s, name, role, spec, OnnxEmbedder(info["path"], s.providers), bench, size, info)


def teacher_rows(s: Scoring, teacher: Teacher, spec: str, out: Path) -> list[dict]:
    """The teacher's rows: PyTorch and its ONNX export; an ``onnx:`` teacher (``spec``) as it is."""
    if teacher.module is None:
        with s.timed("benchmark", "teacher", "onnxruntime"):
            bench = s.bench_onnx(parse_spec(spec).name)
        return [evaluated_row(s, "teacher", "teacher", None, teacher, bench, (None, None))]
    size = count_params(teacher.module), count_gflops(teacher.module, s.image_size)
    with s.timed("benchmark", "teacher", "torch"):
        bench = s.bench_torch(teacher.module)
    rows = [evaluated_row(s, "teacher", "teacher", None, teacher, bench, size)]
    with s.timed("export", "teacher", "onnx"):
        info = export_onnx(teacher.module, out / "teacher.onnx", s.image_size)
    return rows + [onnx_row(s, "teacher", "teacher", None, info, size)]


def student_rows(s: Scoring, trained: list[TrainedStudent], precisions: list[str], out: Path) -> tuple[list[dict], list[dict]]:
    """Every student's rows and the ``export_onnx`` info of each distilled student's ONNX files. The
    baseline is exported and scored like its student: the same architecture, so the same speed
    (benchmarked once per runtime and precision), its own accuracy."""
    calibration = calibration_images(s.data) if "int8-static" in precisions else None
    rows: list[dict] = []
    infos: list[dict] = []
    for t in trained:
        size = count_params(t.student), count_gflops(t.student, s.image_size)
        with s.timed("benchmark", f"student{t.suffix}", "torch"):
            torch_bench = s.bench_torch(t.student)
        models = [(f"student_baseline{t.suffix}", "student_baseline", t.baseline), (f"student{t.suffix}", "student", t.student)]
        models = [(name, role, model) for name, role, model in models if model is not None]
        rows += [evaluated_row(s, name, role, t.spec, model, torch_bench, size, file=out / f"{name}.pt") for name, role, model in models]
        for precision in precisions:
            onnx_bench: dict[str, Any] | None = None
            for name, role, model in models:
                path = out / (f"{name}.onnx" if precision == "fp32" else f"{name}.{precision}.onnx")
                console.print(f"exporting {escape(name)} to ONNX ({precision})")
                with s.timed("export", name, "onnx", precision):
                    info = export_onnx(model, path, s.image_size, precision=precision, calibration=calibration)
                infos += [info] if role == "student" else []
                if onnx_bench is None:  # one graph for baseline and student: benchmarked once
                    with s.timed("benchmark", f"student{t.suffix}", "onnxruntime", precision):
                        onnx_bench = s.bench_onnx(info["path"], s.providers)
                rows.append(onnx_row(s, name, role, t.spec, info, size, bench=onnx_bench))
    return rows, infos
