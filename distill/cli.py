"""The ``distill`` command line (typer). Thin: parse options, call ``distill.pipeline`` and friends.

Every ``DistillError`` becomes one red line and a non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from distill.config import Config
from distill.errors import DistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distil a big embedding teacher into a small, fast student.")
err_console = Console(stderr=True)
DEBUG = {"on": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    DEBUG["on"] = debug


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

    return wrapper


def _trained_size(header: dict) -> list[int]:
    """The input size a model file was trained at (its ``meta``), else the default 64x32."""
    return header.get("meta", {}).get("image_size") or [64, 32]


def _config(config: Optional[Path], **overrides):
    from distill.config import load_config

    return load_config(config, **overrides)


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
    multiscale: Optional[bool] = typer.Option(None, "--multiscale/--no-multiscale", help="Add Deep Ranking's two low-resolution paths."),
    data: Optional[str] = typer.Option(None, help="Data set: synthetic (embedded default) or NAME:PATH, e.g. market1501:/data/Market-1501."),
    image_size: Optional[str] = typer.Option(None, help="Input size HxW, e.g. 64x32 or 256x128."),
    cuhk03_variant: Optional[str] = typer.Option(None, help="cuhk03 only: labeled or detected boxes."),
    bbox_crop: Optional[bool] = typer.Option(None, "--bbox-crop/--no-bbox-crop", help="cub200 only: crop to the bounding boxes."),
    split_file: Optional[str] = typer.Option(None, help="imagefolder only: explicit train/test split file."),
    epochs: Optional[int] = typer.Option(None, help="Student epochs."),
    teacher_epochs: Optional[int] = typer.Option(None, help="Teacher epochs (when it is trained here)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (P identities x K images)."),
    images_per_id: Optional[int] = typer.Option(None, help="K, images per identity in a batch."),
    sampler: Optional[str] = typer.Option(None, help="Batches: pk (P x K) or importance (Deep Ranking's online importance sampling)."),
    lr: Optional[float] = typer.Option(None, help="Student learning rate."),
    loss: Optional[str] = typer.Option(None, help="Task losses with weights, e.g. softmax=1,triplet=1,lifted=0.5."),
    loss_options: Optional[list[str]] = typer.Option(None, "--loss-opt", help="Task-loss hyper-parameter KEY=VALUE (repeatable), e.g. triplet_margin=0.3."),
    kd_weight: Optional[float] = typer.Option(None, help="Weight of Hinton KD (0 disables it)."),
    kd_temperature: Optional[float] = typer.Option(None, help="KD temperature T."),
    darkrank: Optional[str] = typer.Option(None, help="DarkRank mode: hard, soft or none."),
    darkrank_weight: Optional[float] = typer.Option(None),
    darkrank_alpha: Optional[float] = typer.Option(None),
    darkrank_beta: Optional[float] = typer.Option(None),
    darkrank_list_size: Optional[int] = typer.Option(None, help="Candidates per query: the teacher's M nearest (default 8)."),
    darkrank_method: Optional[str] = typer.Option(None, help="Soft DarkRank: exact, bruteforce or sampled."),
    baseline: Optional[bool] = typer.Option(None, "--baseline/--no-baseline", help="Also train the student without distillation."),
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

    run_pipeline(_config(config, **overrides))


@app.command("train-teacher")
@friendly
def train_teacher(
    config: Optional[Path] = ConfigOpt,
    teacher: Optional[str] = typer.Option(None),
    teacher_weights: Optional[str] = typer.Option(None, help="Backbone weights to fine-tune from."),
    data: Optional[str] = typer.Option(None),
    image_size: Optional[str] = typer.Option(None),
    teacher_epochs: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    out: Optional[str] = typer.Option(None),
) -> None:
    """Train (or reuse) the teacher of a run directory: writes <out>/teacher.pt."""
    overrides = {k: v for k, v in locals().items() if k != "config"}
    from distill import pipeline

    cfg = _config(config, **overrides)
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
