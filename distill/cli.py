"""The ``distill`` command line (typer). Thin: parse options, call ``distill.run`` and friends.

Every ``DistillError`` becomes one red line and a non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from distill.config import Config, command_fields, default_value, field_info, flag_name
from distill.config_load import REPLACED_WEIGHTS
from distill.cli_help import SectionedCommand
from distill.console import make_console, one_line_warnings
from distill.errors import DistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distil a big embedding teacher into a small, fast student.")
err_console = make_console(stderr=True)
DEBUG = {"on": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    DEBUG["on"] = debug
    one_line_warnings(debug)


def friendly(fn: Callable) -> Callable:
    """Turn DistillError / Ctrl-C into one clear line and an exit code (unless --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DistillError as err:
            if DEBUG["on"]:
                raise
            err_console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: finished files are intact; continue with --resume")
            raise typer.Exit(130) from None
        except OSError as err:  # a full disk or a lost permission mid-run: files are written atomically
            if DEBUG["on"]:
                raise
            where = f" {err.filename}" if err.filename else ""
            err_console.print(
                f"[red]error:[/] cannot read or write{escape(where)}: {escape(str(err.strerror or err))} (finished files are intact; "
                "free disk space or fix permissions, then run again)",
                highlight=False, soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _trained_size(header: dict) -> list[int]:
    """The input size a model file was trained at (its ``meta``), else the default 64x32."""
    return header.get("meta", {}).get("image_size") or [64, 32]


def _config(config: Optional[Path], **overrides):
    from distill.config_load import load_config

    return load_config(config, **overrides)


def _locked(cfg):
    """Hold the lock of the run's output directory (one run per --out at a time)."""
    from distill.outdir import locked_out_dir

    return locked_out_dir(cfg.out_dir)


ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file (flat keys as in distill.config.Config).")


def _cli_type(f: dataclasses.Field) -> type:
    """The option type of a Config field: what its metadata says it parses, else its own type."""
    if f.metadata["cli_type"] is not None:
        return f.metadata["cli_type"]
    return next(kind for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)) if str(f.type).startswith(name))


def shown_default(name: str) -> str:
    """Field ``name``'s default as help shows it: the value, or what an unset (None) one means."""
    meta = field_info(name)
    if meta["shown"] is not None:
        return meta["shown"]
    default = default_value(name)
    return str(default).lower() if isinstance(default, bool) else str(default)


def _config_parameters(command: str) -> list[inspect.Parameter]:
    """``--config`` and one ``--option`` per Config field the command reads (``command_fields``),
    each in the help panel of its section, with its help line and default."""
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=ConfigOpt, annotation=Optional[Path])]
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if f.name not in command_fields(command) or not meta["cli"]:
            continue
        kind = _cli_type(f)
        flag = flag_name(f.name)
        decls = [f"{flag}/{meta['off_flag'] or '--no-' + flag[2:]}"] if kind is bool else [flag]
        option = typer.Option(
            None, *decls, help=meta["help"], show_default=shown_default(f.name), metavar=meta["metavar"],
            rich_help_panel=meta["section"].capitalize(),
        )
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind]))
    for name in REPLACED_WEIGHTS if "distill" in command_fields(command) else ():  # hidden: given, they fail
        option = typer.Option(None, "--" + name.replace("_", "-"), hidden=True)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[float]))
    return params


def config_command(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Turn ``fn(cfg, **own_options)`` into command ``name`` that also takes the Config fields it reads
    as options (``command_fields``), and ``--config FILE``: values given on the command line override
    the file, which overrides the defaults."""
    return functools.partial(_config_command, name)


def _config_command(name: str, fn: Callable[..., None]) -> Callable[..., None]:
    hints = typing.get_type_hints(fn)
    own = [p.replace(annotation=hints[p.name]) for p in list(inspect.signature(fn).parameters.values())[1:]]
    fields = {f.name for f in dataclasses.fields(Config)} | set(REPLACED_WEIGHTS)

    def command(**kwargs) -> None:
        config = kwargs.pop("config")
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        fn(_config(config, **{k: v for k, v in overrides.items() if v is not None and v != []}), **kwargs)

    command.__name__, command.__doc__ = fn.__name__, fn.__doc__
    command.__signature__ = inspect.Signature(own + _config_parameters(name))
    return friendly(command)


@app.command(cls=SectionedCommand)
@config_command("run")
def run(cfg: Config) -> None:
    """Teacher -> baseline student -> distilled student -> evaluate -> ONNX export -> benchmark -> report."""
    from distill.run import run as run_stages

    with _locked(cfg):
        run_stages(cfg)


@app.command(cls=SectionedCommand)
@config_command("study")
def study(
    cfg: Config,
    recipes: Optional[str] = typer.Option(None, help="Comma-separated recipes, e.g. baseline,kd,darkrank-hard (baseline is always added)."),
    recipes_file: Optional[Path] = typer.Option(None, help="TOML file of [[recipe]] tables: name = \"...\" plus Config keys."),
    seeds: int = typer.Option(5, help="Seeds per recipe (base seed, base seed + 1, ...)."),
    jobs: int = typer.Option(1, help="Trainings run in parallel processes (one thread each)."),
    keep_models: bool = typer.Option(False, "--keep-models/--no-keep-models", help="Keep each training's model file (study/models/RECIPE-seedS.pt; deleted once scored by default)."),
    teacher_per_seed: bool = typer.Option(False, "--teacher-per-seed/--one-teacher", help="Train one teacher per seed (teachers/seedS/), so that the interval includes the teacher's own training noise; by default one teacher serves every seed."),
) -> None:
    """Recipes x seeds on one teacher: mean ± std per recipe and the paired gain over the baseline (95% CI)."""
    from distill import study as study_
    from distill.study_output import print_study

    names = [n.strip() for n in recipes.split(",") if n.strip()] if recipes is not None else None
    file_recipes = study_.load_recipes_file(recipes_file) if recipes_file is not None else None
    recipes_ = study_.recipe_configs(cfg, names, file_recipes)  # a bad recipe is refused before --out is created
    with _locked(cfg):
        result = study_.run_study(cfg, recipes_, seeds=seeds, jobs=jobs, keep_models=keep_models, teacher_per_seed=teacher_per_seed)
    print_study(result)
    err_console.print(f"study: {escape(str(cfg.out_dir / 'study.json'))}, study.md, study.png")


@app.command("train-teacher", cls=SectionedCommand)
@config_command("train-teacher")
def train_teacher(cfg: Config) -> None:
    """Train (or reuse) the teacher of a run directory: writes <out>/teacher.pt."""
    from distill.run import setup
    from distill.teachers.acquire import acquire_teacher, is_distill_model_file

    weights = cfg.teacher_weights
    if weights and Path(weights).is_file() and not is_distill_model_file(weights):
        cfg = dataclasses.replace(cfg, teacher_finetune=True)  # this command trains: a plain state dict is backbone weights to fine-tune
    with _locked(cfg):  # timm:NAME / torchvision:NAME without weights: trained from scratch
        acquire_teacher(*setup(cfg, scratch_teacher=True))
    err_console.print(f"teacher: {escape(str(cfg.out_dir / 'teacher.pt'))}")


@app.command(cls=SectionedCommand)
@config_command("train")
def train(cfg: Config) -> None:
    """Train only the distilled student (teacher trained or reused first): writes <out>/student.pt."""
    from distill.run import setup
    from distill.students.train import student_runs, train_student
    from distill.teachers.acquire import acquire_teacher

    runs = student_runs(cfg)
    if len(runs) > 1:
        raise DistillError("train takes one student: give one spec to --student, or use `distill run` for several")
    cfg = runs[0][2]
    with _locked(cfg):
        cfg, data_, device_ = setup(cfg)
        train_student(cfg, data_, device_, teacher=acquire_teacher(cfg, data_, device_).teacher)
    err_console.print(f"student: {escape(str(cfg.out_dir / 'student.pt'))}")


@app.command("eval", cls=SectionedCommand)
@friendly
def eval_(
    checkpoint: Path = typer.Option(..., help="A model file distill wrote: teacher.pt, student.pt (.safetensors) or an exported .onnx."),
    data: str = typer.Option("synthetic", help="Data set: synthetic, digits, or NAME:PATH."),
    image_size: Optional[str] = typer.Option(
        None, help="Input size HxW (default: the size the model was trained at; for .onnx, its graph's fixed input size)."
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N] (an .onnx file runs in ONNX Runtime's best provider)."),
    clustering: bool = typer.Option(True, "--clustering/--no-clustering", help="NMI/F1 by k-means (slow for ~10k classes without faiss)."),
    layer: Optional[str] = typer.Option(
        None, help="Score the pooled output of this layer instead of the model's own embedding: the layer a run "
        "distils from ('teacher embedding: NAME' in its log, e.g. backbone.blocks.3a). [default: the embedding]",
        show_default=False,
    ),
) -> None:
    """Evaluate a model file or an exported ONNX file: Recall@K, NMI, F1, mAP, rank-1 (the data set's protocol)."""
    import torch

    from distill.data.prepare import prepare_data
    from distill.engine import resolve_device

    embed, size = _scorer(checkpoint, image_size, layer)
    cfg = _config(None, data=data, image_size=size, device=device)
    if isinstance(embed, torch.nn.Module):
        device_ = resolve_device(cfg.device)
        embed = embed.to(device_)
    else:  # ONNX Runtime takes its inputs from the CPU
        device_ = torch.device("cpu")
    data_ = prepare_data(cfg)
    metrics = data_.protocol.test_metrics(embed, data_.splits, data_.eval_transform, device_, clustering)
    table = Table("metric", "value", title=Text(str(checkpoint)))
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}")
    make_console().print(table)


def _scorer(path: Path, image_size: str | None, layer: str | None = None) -> tuple[Callable, str | list[int]]:
    """An embedding function for a file distill wrote and the input size to score it at: a distill
    model file (its recorded size; with ``layer``, that layer's pooled output, as ``--teacher-layer``
    reads it), or an ONNX file in ONNX Runtime (its graph's fixed input size)."""
    from distill.teachers.layers import EMBEDDING

    layer = None if layer == EMBEDDING else layer
    if path.suffix != ".onnx":
        from distill.models import load_model
        from distill.teachers.finished import at_layer

        model, header = load_model(path)
        return at_layer(model, header["arch"], layer), image_size or _trained_size(header)
    if layer is not None:
        raise DistillError(f"{path} runs in ONNX Runtime, which gives only its output: --layer needs a distill model file")
    from distill.bench import onnx_input_size, ort_providers
    from distill.export import OnnxEmbedder

    if not path.is_file():
        raise DistillError(f"ONNX file {path} does not exist")
    size = image_size or onnx_input_size(path)
    if size is None:
        raise DistillError(f"{path} has no fixed input size in its graph: give --image-size HxW")
    return OnnxEmbedder(path, ort_providers()), size


@app.command(cls=SectionedCommand)
@friendly
def export(
    checkpoint: Path = typer.Option(..., help="A distill model file (teacher.pt, student.pt)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the .onnx file."),
    image_size: Optional[str] = typer.Option(None, help="Input size HxW (default: the size the model was trained at)."),
    precision: str = typer.Option("fp32", help="fp32, fp16 or int8 (int8-static needs calibration images: use `distill run --export-precision`)."),
) -> None:
    """Export a model file to ONNX (dynamic batch), check it and its parity with ONNX Runtime."""
    from distill.config_load import check_type
    from distill.export import export_onnx
    from distill.models import load_model

    model, header = load_model(checkpoint)
    info = export_onnx(model, output, check_type("image_size", image_size or _trained_size(header)), precision=precision)
    make_console().print(f"wrote {escape(info['path'])} (max abs diff vs PyTorch {info['max_abs_diff']:.2e})")


@app.command(cls=SectionedCommand)
@friendly
def bench(
    checkpoint: Optional[Path] = typer.Option(None, help="A distill model file (PyTorch eager)."),
    onnx: Optional[Path] = typer.Option(None, help="An .onnx file (ONNX Runtime)."),
    image_size: Optional[str] = typer.Option(None, help="Input size HxW (default: the model file's, or the ONNX graph's fixed input size)."),
    iters: int = typer.Option(50, help="Timed calls per round; rounds repeat until the median is stable."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N] (for --checkpoint)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result, machine and library versions as JSON."),
) -> None:
    """Latency p50/p90/p99 at batch 1 and throughput at batch 64."""
    import json

    from distill.atomic import atomic_write_text
    from distill.bench import benchmark_onnx, benchmark_torch, machine_info, onnx_input_size
    from distill.config_load import check_type
    from distill.engine import resolve_device
    from distill.models import load_model

    if (checkpoint is None) == (onnx is None):
        raise DistillError("give exactly one of --checkpoint or --onnx")
    if checkpoint is not None:
        model, header = load_model(checkpoint)
        size = check_type("image_size", image_size or _trained_size(header))
        result = benchmark_torch(model, size, iters=iters, device=str(resolve_device(device)))
    else:
        size = check_type("image_size", image_size) if image_size else onnx_input_size(onnx)
        if size is None:
            raise DistillError(f"{onnx} has no fixed input size in its graph: give --image-size HxW")
        result = benchmark_onnx(onnx, size, iters=iters)
    result = {"image_size": list(size)} | result | {"machine": machine_info()}
    table = Table("field", "value")
    for k, v in result.items():
        table.add_row(k, Text(f"{v:.3f}" if isinstance(v, float) else str(v)))
    make_console().print(table)
    if json_out is not None:
        try:
            atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")
        except OSError as err:
            raise DistillError(f"cannot write the JSON file {json_out}: {err.strerror} (choose another --json path)") from None


@app.command(cls=SectionedCommand)
@friendly
def report(out: Path = typer.Argument(..., help="A run directory or its report.json.")) -> None:
    """Print a saved report again."""
    from distill.report import load_report, print_report

    print_report(load_report(out / "report.json" if out.is_dir() else out))


@app.command("list", cls=SectionedCommand)
@friendly
def list_() -> None:
    """Known teachers, students, data sets, task losses (--loss) and distillation terms (--distill), the
    losses with their hyper-parameters' defaults."""
    from distill.data import dataset_names
    from distill.losses.registry import KINDS, entries
    from distill.models import model_names
    from distill.students import student_names

    table = Table("kind", "names")
    table.add_row("teachers", ", ".join(model_names("teacher")) + ", timm:NAME, torchvision:NAME, onnx:PATH")
    table.add_row("students", ", ".join(student_names()) + ", timm:NAME")
    table.add_row("data sets", ", ".join(dataset_names()) + " (NAME:PATH)")
    losses = Table("option", "name", "what", "defaults")
    for kind, (_, option) in KINDS.items():
        for name, entry in entries(kind).items():
            defaults = ", ".join(f"{k}={'unset' if v is None else v}" for k, v in entry.defaults.items())
            losses.add_row(option, name, entry.summary + (" (learned parts)" if entry.learnable else ""), defaults or "-")
    make_console().print(table, losses)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
