"""The ``distill`` command line (typer). Thin: parse options, call ``distill.pipeline`` and friends.

Every ``DistillError`` becomes one red line and a non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from distill.config import Config
from distill.errors import DistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distil a big embedding teacher into a small, fast student.")
err_console = Console(stderr=True)
DEBUG = {"on": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    DEBUG["on"] = debug
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line ``warning: ...`` (the source line only with --debug)."""
    where = f" ({filename}:{lineno})" if DEBUG["on"] else ""
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}{where}", highlight=False, soft_wrap=True)


def friendly(fn: Callable) -> Callable:
    """Turn DistillError / Ctrl-C into one clear line and an exit code (unless --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DistillError as err:
            if DEBUG["on"]:
                raise
            err_console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: finished files are intact; continue with --resume")
            raise typer.Exit(130) from None
        except OSError as err:  # a full disk or a lost permission mid-run: files are written atomically
            if DEBUG["on"]:
                raise
            where = f" {err.filename}" if err.filename else ""
            err_console.print(
                f"[red]error:[/] cannot read or write{where}: {err.strerror or err} (finished files are intact; "
                "free disk space or fix permissions, then run again)",
                highlight=False, soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _trained_size(header: dict) -> list[int]:
    """The input size a model file was trained at (its ``meta``), else the default 64x32."""
    return header.get("meta", {}).get("image_size") or [64, 32]


def _config(config: Optional[Path], **overrides):
    from distill.config import load_config

    return load_config(config, **overrides)


def _locked(cfg):
    """Hold the lock of the run's output directory (one run per --out at a time)."""
    from distill.outdir import locked_out_dir

    return locked_out_dir(cfg.out_dir)


ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file (flat keys as in distill.config.Config).")


@app.command()
@friendly
def run(
    config: Optional[Path] = ConfigOpt,
    teacher: Optional[str] = typer.Option(None, help="Teacher: inception_bn, timm:NAME, torchvision:NAME or onnx:PATH."),
    teacher_weights: Optional[str] = typer.Option(None, help="Local teacher weights: a distill model file, or backbone weights to fine-tune."),
    student: Optional[str] = typer.Option(
        None, help="Student(s): nin_bn or timm:NAME (see `distill list`), or a comma-separated list; NAME@WIDTH sets the width, "
        "e.g. nin_bn@0.25,nin_bn@0.5,timm:mobilenetv3_small_100."
    ),
    student_width: Optional[float] = typer.Option(None, help="Width multiplier of students given without @WIDTH (0.5 = leaner, faster)."),
    embed_dim: Optional[int] = typer.Option(None, help="Embedding size of the student (and of a teacher trained here); --compat-weight needs the teacher's."),
    multiscale: Optional[bool] = typer.Option(None, "--multiscale/--no-multiscale", help="Add Deep Ranking's two low-resolution paths."),
    data: Optional[str] = typer.Option(None, help="Data set: synthetic (embedded default) or NAME:PATH, e.g. market1501:/data/Market-1501."),
    image_size: Optional[str] = typer.Option(None, help="Input size HxW, e.g. 64x32 or 256x128 (default: chosen from the data set)."),
    augment: Optional[str] = typer.Option(None, help="Augmentation preset: none, light or standard (default: chosen from the data set)."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Random horizontal flip in training (default: on for 'standard')."),
    val_fraction: Optional[float] = typer.Option(None, help="Training identities held out for validation, best checkpoints and the teacher gate (0 = off; default 0.2)."),
    cuhk03_variant: Optional[str] = typer.Option(None, help="cuhk03 only: labeled or detected boxes."),
    bbox_crop: Optional[bool] = typer.Option(None, "--bbox-crop/--no-bbox-crop", help="cub200 only: crop to the bounding boxes."),
    split_file: Optional[str] = typer.Option(None, help="imagefolder only: explicit train/test split file."),
    epochs: Optional[int] = typer.Option(None, help="Student epochs."),
    teacher_epochs: Optional[int] = typer.Option(None, help="Teacher epochs (when it is trained here)."),
    steps: Optional[int] = typer.Option(None, help="Student optimiser steps, rounded up to whole epochs (overrides --epochs)."),
    teacher_steps: Optional[int] = typer.Option(None, help="Teacher optimiser steps (overrides --teacher-epochs)."),
    min_steps: Optional[int] = typer.Option(None, help="At least this many student steps, however small the data set (default 150)."),
    teacher_min_steps: Optional[int] = typer.Option(None, help="At least this many teacher steps (default 300)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (P identities x K images)."),
    images_per_id: Optional[int] = typer.Option(None, help="K, images per identity in a batch."),
    sampler: Optional[str] = typer.Option(None, help="Batches: pk (P x K) or importance (Deep Ranking's online importance sampling)."),
    lr: Optional[float] = typer.Option(None, help="Student learning rate."),
    teacher_lr: Optional[float] = typer.Option(None, help="Teacher learning rate (when it is trained here)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (teacher and students)."),
    loss: Optional[str] = typer.Option(None, help="Task losses with weights, e.g. softmax=1,triplet=1,lifted=0.5."),
    loss_options: Optional[list[str]] = typer.Option(None, "--loss-opt", help="Task-loss hyper-parameter KEY=VALUE (repeatable), e.g. triplet_margin=0.3."),
    kd_weight: Optional[float] = typer.Option(None, help="Weight of Hinton KD (0 disables it)."),
    kd_temperature: Optional[float] = typer.Option(None, help="KD temperature T."),
    darkrank: Optional[str] = typer.Option(None, help="DarkRank mode: hard, soft or none."),
    darkrank_weight: Optional[float] = typer.Option(None),
    darkrank_alpha: Optional[float] = typer.Option(None),
    darkrank_beta: Optional[float] = typer.Option(None),
    darkrank_list_size: Optional[str] = typer.Option(None, help="Candidates per query: the teacher's M nearest (default 8), or 'all' (every other sample, the paper)."),
    darkrank_method: Optional[str] = typer.Option(None, help="Soft DarkRank: exact, bruteforce, sampled or sampled_prefix."),
    darkrank_topk: Optional[int] = typer.Option(None, help="Hard DarkRank: ListMLE@k, the teacher's first k picks over the whole list."),
    darkrank_samples: Optional[int] = typer.Option(None, help="Soft DarkRank, sampled methods: rankings drawn per query (default 128)."),
    rkd_distance_weight: Optional[float] = typer.Option(None, help="Weight of RKD distance (Park et al. 2019; 0 = off)."),
    rkd_angle_weight: Optional[float] = typer.Option(None, help="Weight of RKD angle (0 = off)."),
    pkt_weight: Optional[float] = typer.Option(None, help="Weight of PKT (Passalis & Tefas 2018; 0 = off)."),
    regression_weight: Optional[float] = typer.Option(None, help="Weight of embedding regression onto the teacher (learned projection if sizes differ; 0 = off)."),
    compat_weight: Optional[float] = typer.Option(None, help="Weight of the teacher-compatibility loss (needs --embed-dim = the teacher's; 0 = off)."),
    baseline: Optional[bool] = typer.Option(None, "--baseline/--no-baseline", help="Also train the student without distillation."),
    require_better_teacher: Optional[bool] = typer.Option(
        None, "--require-better-teacher/--allow-weaker-teacher", help="Fail (exit 1) when the teacher is not clearly better than the student alone on validation."
    ),
    gate_margin: Optional[float] = typer.Option(None, help="How much better the teacher must score on validation (default 0.02)."),
    clustering: Optional[bool] = typer.Option(None, "--clustering/--no-clustering", help="NMI/F1 by k-means (slow for ~10k classes without faiss)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda[:N]."),
    seed: Optional[int] = typer.Option(None),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="bf16 autocast on GPU."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the models."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue interrupted training from checkpoints."),
    strict: Optional[bool] = typer.Option(None, "--strict/--no-strict", help="Fail on unreadable images instead of skipping them."),
    export_precision: Optional[str] = typer.Option(
        None, help="ONNX precisions, comma-separated: fp32, fp16, int8 (dynamic), int8-static (calibrated on training images)."
    ),
    target_accuracy: Optional[float] = typer.Option(
        None, help="Share of the teacher's accuracy a student should keep; the report names the one closest to it.  "
        f"[default: {Config.target_accuracy}]"
    ),
    bench_iters: Optional[int] = typer.Option(None, help="Timed iterations per benchmark."),
    out: Optional[str] = typer.Option(None, help="Output directory (default runs/<name>)."),
    name: Optional[str] = typer.Option(None, help="Run name."),
) -> None:
    """Teacher -> baseline student -> distilled student -> evaluate -> ONNX export -> benchmark -> report."""
    overrides = {k: v for k, v in locals().items() if k != "config" and v != []}
    from distill.pipeline import run as run_pipeline

    cfg = _config(config, **overrides)
    with _locked(cfg):
        run_pipeline(cfg)


@app.command()
@friendly
def study(
    config: Optional[Path] = ConfigOpt,
    recipes: Optional[str] = typer.Option(None, help="Comma-separated recipes, e.g. baseline,kd,darkrank-hard (baseline is always added)."),
    recipes_file: Optional[Path] = typer.Option(None, help="TOML file of \\[\\[recipe]] tables: name = \"...\" plus Config keys."),
    seeds: int = typer.Option(5, help="Seeds per recipe (base seed, base seed + 1, ...)."),
    jobs: int = typer.Option(1, help="Trainings run in parallel processes (one thread each)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher: inception_bn, timm:NAME, torchvision:NAME or onnx:PATH."),
    teacher_weights: Optional[str] = typer.Option(None, help="Local teacher weights: a distill model file, or backbone weights to fine-tune."),
    student: Optional[str] = typer.Option(None, help="Student: nin_bn or timm:NAME."),
    student_width: Optional[float] = typer.Option(None, help="Student width multiplier."),
    data: Optional[str] = typer.Option(None, help="Data set: synthetic or NAME:PATH."),
    image_size: Optional[str] = typer.Option(None, help="Input size HxW, e.g. 64x32."),
    epochs: Optional[int] = typer.Option(None, help="Student epochs."),
    teacher_epochs: Optional[int] = typer.Option(None, help="Teacher epochs (when it is trained here)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (P identities x K images)."),
    images_per_id: Optional[int] = typer.Option(None, help="K, images per identity in a batch."),
    lr: Optional[float] = typer.Option(None, help="Student learning rate."),
    loss: Optional[str] = typer.Option(None, help="Task losses with weights, e.g. softmax=1,triplet=1."),
    loss_options: Optional[list[str]] = typer.Option(None, "--loss-opt", help="Task-loss hyper-parameter KEY=VALUE (repeatable)."),
    clustering: Optional[bool] = typer.Option(None, "--clustering/--no-clustering", help="NMI/F1 by k-means."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda[:N]."),
    seed: Optional[int] = typer.Option(None, help="First seed."),
    workers: Optional[int] = typer.Option(None, help="Data-loader worker processes per training."),
    out: Optional[str] = typer.Option(None, help="Output directory (default runs/<name>); results in <out>/study/."),
    name: Optional[str] = typer.Option(None, help="Run name."),
) -> None:
    """Recipes x seeds on one teacher: mean ± std per recipe and the paired gain over the baseline (95% CI)."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "recipes", "recipes_file", "seeds", "jobs") and v != []}
    from distill import study as study_

    base = _config(config, **overrides)
    names = [n.strip() for n in recipes.split(",") if n.strip()] if recipes is not None else None
    file_recipes = study_.load_recipes_file(recipes_file) if recipes_file is not None else None
    result = study_.run_study(base, study_.recipe_configs(base, names, file_recipes), seeds=seeds, jobs=jobs)
    study_.print_study(result)
    err_console.print(f"study: {base.out_dir / 'study.json'}, study.md, study.png")


@app.command("train-teacher")
@friendly
def train_teacher(
    config: Optional[Path] = ConfigOpt,
    teacher: Optional[str] = typer.Option(None),
    teacher_weights: Optional[str] = typer.Option(None, help="Backbone weights to fine-tune from."),
    data: Optional[str] = typer.Option(None),
    image_size: Optional[str] = typer.Option(None),
    teacher_epochs: Optional[int] = typer.Option(None),
    teacher_steps: Optional[int] = typer.Option(None, help="Teacher optimiser steps (overrides --teacher-epochs)."),
    teacher_min_steps: Optional[int] = typer.Option(None, help="At least this many teacher steps (default 300)."),
    teacher_lr: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (P identities x K images)."),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    out: Optional[str] = typer.Option(None),
) -> None:
    """Train (or reuse) the teacher of a run directory: writes <out>/teacher.pt."""
    overrides = {k: v for k, v in locals().items() if k != "config"}
    from distill import pipeline

    cfg = _config(config, **overrides)
    with _locked(cfg):
        pipeline.get_teacher(cfg, *pipeline.setup(cfg))
    err_console.print(f"teacher: {cfg.out_dir / 'teacher.pt'}")


@app.command()
@friendly
def train(
    config: Optional[Path] = ConfigOpt,
    teacher: Optional[str] = typer.Option(None),
    teacher_weights: Optional[str] = typer.Option(None),
    student: Optional[str] = typer.Option(None),
    data: Optional[str] = typer.Option(None),
    image_size: Optional[str] = typer.Option(None),
    epochs: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (P identities x K images)."),
    seed: Optional[int] = typer.Option(None),
    loss: Optional[str] = typer.Option(None),
    sampler: Optional[str] = typer.Option(None, help="pk or importance."),
    darkrank: Optional[str] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume"),
    out: Optional[str] = typer.Option(None),
) -> None:
    """Train only the distilled student (teacher trained or reused first): writes <out>/student.pt."""
    overrides = {k: v for k, v in locals().items() if k != "config"}
    from distill import pipeline

    cfg = _config(config, **overrides)
    runs = pipeline.student_runs(cfg)
    if len(runs) > 1:
        raise DistillError("train takes one student: give one spec to --student, or use `distill run` for several")
    cfg = runs[0][2]
    with _locked(cfg):
        data_, device_ = pipeline.setup(cfg)
        pipeline.train_student(cfg, data_, device_, teacher=pipeline.get_teacher(cfg, data_, device_))
    err_console.print(f"student: {cfg.out_dir / 'student.pt'}")


@app.command("eval")
@friendly
def eval_(
    checkpoint: Path = typer.Option(..., help="A distill model file (teacher.pt, student.pt)."),
    data: str = typer.Option("synthetic", help="Data set NAME:PATH."),
    image_size: Optional[str] = typer.Option(None, help="Input size HxW (default: the size the model was trained at)."),
    device: str = typer.Option("auto"),
    clustering: bool = typer.Option(True, "--clustering/--no-clustering", help="NMI/F1 by k-means (slow for ~10k classes without faiss)."),
) -> None:
    """Evaluate a model file: Recall@K, NMI, F1, mAP, rank-1 (the data set's protocol)."""
    from distill import pipeline
    from distill.modelfile import load_model

    model, info = load_model(checkpoint)
    cfg = _config(None, data=data, image_size=image_size or _trained_size(info), device=device)
    device_ = pipeline.resolve_device(cfg.device)
    metrics = pipeline.evaluate_model(model.to(device_), pipeline.prepare_data(cfg), device_, clustering)
    table = Table("metric", "value", title=str(checkpoint))
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    Console().print(table)


@app.command()
@friendly
def export(
    checkpoint: Path = typer.Option(..., help="A distill model file."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the .onnx file."),
    image_size: Optional[str] = typer.Option(None, help="Input size HxW (default: the size the model was trained at)."),
    precision: str = typer.Option("fp32", help="fp32, fp16 or int8."),
) -> None:
    """Export a model file to ONNX (dynamic batch), check it and its parity with ONNX Runtime."""
    from distill.config import _coerce
    from distill.export import export_onnx
    from distill.modelfile import load_model

    model, header = load_model(checkpoint)
    info = export_onnx(model, output, _coerce("image_size", image_size or _trained_size(header)), precision=precision)
    Console().print(f"wrote {info['path']} (max abs diff vs PyTorch {info['max_abs_diff']:.2e})")


@app.command()
@friendly
def bench(
    checkpoint: Optional[Path] = typer.Option(None, help="A distill model file (PyTorch eager)."),
    onnx: Optional[Path] = typer.Option(None, help="An .onnx file (ONNX Runtime)."),
    image_size: Optional[str] = typer.Option(None, help="Input size HxW (default: the model file's, or the ONNX graph's fixed input size)."),
    iters: int = typer.Option(50, help="Timed calls per round; rounds repeat until the median is stable."),
    device: str = typer.Option("auto"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result, machine and library versions as JSON."),
) -> None:
    """Latency p50/p90/p99 at batch 1 and throughput at batch 64."""
    import json

    from distill.atomic import atomic_write_text
    from distill.bench import benchmark_onnx, benchmark_torch, machine_info, onnx_input_size
    from distill.config import _coerce
    from distill.engine import resolve_device
    from distill.modelfile import load_model

    if (checkpoint is None) == (onnx is None):
        raise DistillError("give exactly one of --checkpoint or --onnx")
    if checkpoint is not None:
        model, header = load_model(checkpoint)
        size = _coerce("image_size", image_size or _trained_size(header))
        result = benchmark_torch(model, size, iters=iters, device=str(resolve_device(device)))
    else:
        size = _coerce("image_size", image_size) if image_size else onnx_input_size(onnx)
        if size is None:
            raise DistillError(f"{onnx} has no fixed input size in its graph: give --image-size HxW")
        result = benchmark_onnx(onnx, size, iters=iters)
    result = {"image_size": list(size)} | result | {"machine": machine_info()}
    table = Table("field", "value")
    for k, v in result.items():
        table.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    Console().print(table)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")


@app.command()
@friendly
def report(out: Path = typer.Argument(..., help="A run directory or its report.json.")) -> None:
    """Print a saved report again."""
    from distill.report import load_report, print_report

    print_report(load_report(out / "report.json" if out.is_dir() else out))


@app.command("list")
@friendly
def list_() -> None:
    """Known teachers, students, data sets and task losses."""
    from distill.data import dataset_names
    from distill.losses.task import task_loss_names
    from distill.students import student_names
    from distill.teachers import teacher_names

    table = Table("kind", "names")
    table.add_row("teachers", ", ".join(teacher_names()) + ", timm:NAME, torchvision:NAME, onnx:PATH")
    table.add_row("students", ", ".join(student_names()) + ", timm:NAME")
    table.add_row("data sets", ", ".join(dataset_names()) + " (NAME:PATH)")
    table.add_row("task losses", ", ".join(task_loss_names()))
    Console().print(table)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
