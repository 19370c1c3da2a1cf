"""``distill run`` as a short script of stages: prepare the data -> acquire the teacher -> train the
students -> evaluate, export and benchmark every model -> report.

Each stage is a plain function of the module that owns it, usable from Python; the CLI only parses
options and calls them. Only the main process (rank 0 under torchrun) evaluates, exports,
benchmarks and writes the report.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from rich.markup import escape

from distill.config import Config
from distill.config_load import export_precisions, label_free, student_specs
from distill.console import make_console
from distill.data.prepare import Prepared, prepare_data, prepare_out_dir
from distill.engine import is_main_process, resolve_device
from distill.errors import DistillError
from distill.models import build_model, model_cfg, parse_spec
from distill.students import create_student
from distill.students.train import train_students
from distill.students.weights import load_student_weights, student_weights_file
from distill.teachers.acquire import acquire_teacher
from distill.teachers.layers import EMBEDDING
from distill.timing import StageClock, summary_line

console = make_console(stderr=True)


def run(cfg: Config) -> dict:
    """The whole job of ``distill run``; returns the report dict (also written to ``cfg.out_dir``).

    Every student of the config is trained without (baseline) and with distillation against the one
    teacher; every report row is scored on the test set with the artefact it names: the PyTorch
    model, or each exported ONNX file (one per precision) run in ONNX Runtime. From ``setup`` on,
    ``cfg`` is the config with the inputs chosen from the data filled in.
    """
    from distill.bench import machine_info  # ONNX and the report only where they are used
    from distill.report import build_report, print_report, write_report
    from distill.rows import scoring, student_rows, teacher_rows

    started, clock = time.perf_counter(), StageClock()
    with clock.stage("data"):
        cfg, data, device = setup(cfg)
    acquired = acquire_teacher(cfg, data, device)
    for name, seconds in acquired.timings.items():
        clock.add(name, seconds)
    trained, gate = train_students(cfg, data, device, acquired.teacher, clock)
    if not is_main_process():
        return {}

    score = scoring(data, device, clock, cfg.image_size, cfg.bench_iters, cfg.clustering)
    rows = teacher_rows(score, acquired.teacher, cfg.teacher, cfg.out_dir)
    student, onnx_infos = student_rows(score, trained, export_precisions(cfg), cfg.out_dir)

    with clock.stage("report"):
        config = cfg.to_dict() | {"device_resolved": str(device), "wall_time_s": round(time.perf_counter() - started, 1)}
        report = build_report(rows + student, config, onnx_infos[0], protocol=data.splits.protocol,
                              target_accuracy=cfg.target_accuracy, machine=machine_info())
        report |= {"teacher_gate": gate, "teacher_layer": acquired.layer_choice}
        fits = {"teacher": acquired.fit}
        for t in trained:
            fits |= {f"student_baseline{t.suffix}": t.baseline_fit, f"student{t.suffix}": t.fit}
        report |= selection_report(fits)
        report["test_set"] = data.splits.name if data.splits.query else None  # None: no test set, no accuracy measured
        print_report(report)
    removed = [] if cfg.keep_comparison_files else comparison_files(report, cfg.out_dir)
    report |= {"removed_files": [p.name for p in removed]} if removed else {}
    report["timings"] = clock.timings()  # written with the report: what is left is writing the files
    write_report(report, cfg.out_dir)
    finished_run_files(cfg, removed)
    console.print(summary_line(clock.timings()), highlight=False)
    return report


def comparison_files(report: dict, out: Path) -> list[Path]:
    """The files of ``out`` made only to score a comparison row of ``report``: the teacher's ONNX
    export and each baseline's model file and ONNX exports, less the one the verdict ships (a given
    teacher file, outside ``out`` or not written by the run, is never one of them)."""
    shipped = ((report.get("target") or {}).get("best") or {}).get("file")
    made = {row.get("onnx_file") or row.get("file") for row in report["models"] if row["role"] in ("teacher", "student_baseline")}
    return sorted(Path(f) for f in made if f and f != shipped and Path(f).parent == out)


def finished_run_files(cfg: Config, comparison: list[Path]) -> None:
    """Once the report is written: remove the ``comparison`` files (one line names them) and, unless
    ``keep_checkpoints``, the teacher-output cache (kept for ``--resume`` until the run finished)."""
    for path in comparison:
        path.unlink(missing_ok=True)
    if comparison:
        console.print(f"removed after scoring, as only their report rows are needed: {', '.join(p.name for p in comparison)} "
                      "(--keep-comparison-files keeps them)", highlight=False)
    if not cfg.keep_checkpoints:
        shutil.rmtree(cfg.out_dir / "cache", ignore_errors=True)


def selection_report(fits: dict[str, dict | None]) -> dict:
    """``selection``: per model trained with validation (``fits``: name -> training summary, None for
    one not trained here), the epoch kept and its score, the highest and the last epoch's score, the
    chance level; ``warnings``: the sentence of each model near chance."""
    selection = {name: fit for name, fit in fits.items() if fit and "best_epoch" in fit}
    return {"selection": selection, "warnings": [fit["chance_note"] for fit in selection.values() if fit.get("chance_note")]}


def setup(cfg: Config, scratch_teacher: bool = False) -> tuple[Config, Prepared, torch.device]:
    """What every command that trains needs first: checked names (``check_models``), a writable out
    dir, the data. Returns the config the run trains with (``cfg`` with the inputs chosen from the
    data filled in: ``Inputs.fill``, a copy; ``cfg`` is unchanged), the data and the device."""
    device = resolve_device(cfg.device)
    check_models(cfg, scratch_teacher)
    prepare_out_dir(cfg)
    data = prepare_data(cfg, device)
    val = f", {len(data.val)} validation images of held-out identities" if data.val else ""
    val += f", {len(data.unlabeled)} unlabeled images" if data.unlabeled else ""
    console.print(
        f"data [bold]{escape(data.splits.name)}[/]: {len(data.train)} train images of {data.num_classes} identities{val}, "
        f"{len(data.splits.query)} queries, {len(data.splits.gallery)} gallery; device {device}"
    )
    return data.inputs.fill(cfg), data, device


def check_models(cfg: Config, scratch_teacher: bool = False) -> None:
    """Fail fast on an unknown teacher/student name, a missing file or student weights that do not
    fit, before any training starts. A timm/torchvision teacher needs weights unless
    ``scratch_teacher`` (``distill train-teacher``: trained here from random weights)."""
    for name, width in student_specs(cfg):
        student = create_student(name, cfg.embed_dim, 2, width=width, multiscale=cfg.multiscale)
        weights = student_weights_file(cfg.student_weights, cfg.student_pretrained, name)
        if weights:
            load_student_weights(student, weights, name, width)
    teacher = parse_spec(cfg.teacher)
    if teacher.kind == "onnx":
        if not Path(teacher.name).is_file():
            raise DistillError(f"ONNX teacher file not found: {teacher.name}")
        if cfg.teacher_layer not in ("auto", EMBEDDING) or cfg.teacher_finetune:
            raise DistillError(f"{cfg.teacher} runs in ONNX Runtime as it is: drop --teacher-layer and --teacher-finetune")
    elif teacher.kind == "builtin":
        names = [n for n, _ in build_model(cfg.teacher, cfg.embed_dim, 2).named_modules() if n]
        if cfg.teacher_layer not in ("auto", EMBEDDING, *names):
            raise DistillError(
                f"--teacher-layer: {cfg.teacher} has no layer '{cfg.teacher_layer}'; use auto, embedding or one of "
                f"{', '.join(model_cfg(cfg.teacher).feature_layers)} (or another module name)"
            )
    else:
        build_model(cfg.teacher, cfg.embed_dim, 2)  # an unknown timm/torchvision name fails here
    _check_teacher_weights(cfg, teacher.kind, scratch_teacher)


def _check_teacher_weights(cfg: Config, kind: str, scratch_teacher: bool) -> None:
    """The teacher's weights: given where they must be, and only where they can be used."""
    if cfg.teacher_weights and not Path(cfg.teacher_weights).is_file():
        raise DistillError(f"teacher weights not found: {cfg.teacher_weights}")
    if kind in ("timm", "torchvision") and not cfg.teacher_weights and not scratch_teacher:
        raise DistillError(
            f"teacher {cfg.teacher} needs local weights (nothing is downloaded): pass --teacher-weights PATH, "
            "a .pth/.safetensors state dict of the library model (used as it is, or fine-tuned here first with "
            f"--teacher-finetune) or a distill model file (e.g. from `distill train-teacher --teacher {cfg.teacher}`, "
            "which trains it from scratch)"
        )
    if label_free(cfg) and kind != "onnx" and (not cfg.teacher_weights or cfg.teacher_finetune):
        raise DistillError(
            "a run on unlabeled images alone learns from a finished teacher: pass --teacher-weights PATH (a distill "
            "model file or the finished model's state dict, used as it is; no --teacher-finetune)"
        )
    if cfg.teacher_finetune and not cfg.teacher_weights:
        raise DistillError("--teacher-finetune fine-tunes given weights: pass --teacher-weights PATH (a plain state dict)")
