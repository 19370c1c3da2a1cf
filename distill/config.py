"""One typed config for a run: defaults, then a TOML file, then command-line overrides."""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from distill.errors import DistillError


PRECISIONS = ("fp32", "fp16", "int8", "int8-static")  # the ONNX precisions export writes
DEFAULT_EPOCHS = 12  # student epochs when neither --epochs nor --steps is given
DEFAULT_TEACHER_EPOCHS = 24  # 16 left BN-Inception under-trained: R@1 0.74-0.85 run to run vs 0.885-0.893 at 24

# How the options are grouped in ``--help`` and docs/cli.md, in this order.
SECTIONS = ("model", "data", "training", "distillation", "export and report", "run")
# The stages of ``distill run`` in order; a field's ``stage`` is the first one that reads it, and a
# command that runs the stages up to S (COMMAND_STAGES) takes the options of S and those before it.
STAGES = ("teacher", "student", "evaluate", "report")
COMMAND_STAGES = {"train-teacher": "teacher", "train": "student", "study": "evaluate", "run": "report"}


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    section: str,
    stage: str = "teacher",
    factory: Callable[[], Any] | None = None,
    shapes_teacher: bool = False,
    shared: bool = False,
    result: bool = True,
    trains: bool = True,
    above: float | None = None,
    at_least: float | None = None,
    flag: str | None = None,
    off_flag: str | None = None,
    shown: str | None = None,
    kind: str | None = None,
    cli_type: type | None = None,
    metavar: str | None = None,
    cli: bool = True,
) -> Any:
    """A ``Config`` field with its one-line ``help`` and what the code needs to know about it:

    ``section``: its group in ``--help`` (``SECTIONS``); ``stage``: the first stage of ``distill run``
    that reads it (``STAGES``: which commands take it); ``shapes_teacher``: a teacher trained here
    depends on it (the cached teacher is reused only when all of these match); ``shared``: every recipe
    of a study shares it (a recipe may not set it); ``result``: it can change a trained or scored number
    (False: a stored study result made with another value is still valid); ``trains``: it can change a
    trained weight; ``above``/``at_least``: the lower bound of a number (excluded/included); ``flag`` /
    ``off_flag``: the option's names when not ``--field-name`` / ``--no-field-name``; ``shown``: the
    default as ``--help`` shows it (for a None with a meaning); ``kind``: what a value must be, for the
    type error; ``cli_type``: what the option parses when not the field's type; ``metavar``: how help
    names its value (default: from the type); ``cli``: False for TOML-only fields.
    """
    if section not in SECTIONS or stage not in STAGES:
        raise ValueError(f"section must be one of {SECTIONS} and stage one of {STAGES}, got {section!r}, {stage!r}")
    metadata = dict(
        help=help, section=section, stage=stage, shapes_teacher=shapes_teacher, shared=shared, result=result,
        trains=trains, above=above, at_least=at_least, flag=flag, off_flag=off_flag, shown=shown, kind=kind,
        cli_type=cli_type, metavar=metavar, cli=cli,
    )
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_TEACHER = dict(stage="teacher", shapes_teacher=True)
_STUDENT = dict(stage="student")
_OUTPUT_ONLY = dict(result=False, trains=False)


@dataclass
class Config:
    """Everything ``distill run`` needs. The defaults run the embedded data set in a few CPU minutes."""

    # model
    teacher: str = option(
        "inception_bn", "Teacher: inception_bn, timm:NAME, torchvision:NAME or onnx:PATH.", section="model", shared=True, **_TEACHER
    )
    teacher_weights: str | None = option(
        None, "Local teacher weights: a distill model file, or a state dict of the finished model (used as it is).",
        section="model", shared=True, shown="none", **_TEACHER,
    )
    teacher_layer: str = option(
        "auto", "Teacher layer whose (pooled) output is the embedding: auto (the one that retrieves best on validation), "
        "embedding (the model's own: pooled features before the classifier) or a layer name.", section="model",
    )
    teacher_finetune: bool = option(
        False, "Fine-tune the teacher weights on the task data with a new embedding head first, instead of using the model as it is.",
        section="model",
    )
    student: str = option(
        "nin_bn", "Student(s): nin_bn or timm:NAME, or a comma-separated list; NAME@WIDTH sets the width (nin_bn@0.25,nin_bn@0.5).",
        section="model", **_STUDENT,
    )
    students: list[str] | None = option(
        None, "The students as a TOML list (give student or students, not both).", section="model", cli=False,
        trains=False, **_STUDENT,
    )
    student_width: float = option(  # full-width NIN-BN costs only 1.6x fewer FLOPs than BN-Inception
        0.5, "Width multiplier of students given without @WIDTH (0.5 = leaner, faster).", section="model", above=0.0, **_STUDENT
    )
    multiscale: bool = option(False, "Add Deep Ranking's two low-resolution paths to the student.", section="model", **_STUDENT)
    student_weights: str | None = option(
        None, "Start the student from these weights: a .pth/.pt/.safetensors state dict of the timm/torchvision/builtin "
        "model, or a distill model file (its architecture is then the default --student); new heads stay fresh.",
        section="model", shown="none", **_STUDENT,
    )
    student_pretrained: bool = option(
        False, "timm students: start from timm's pretrained weights, read from the local Hugging Face cache only "
        "(nothing is downloaded; the error names the file to fetch).", section="model", **_STUDENT,
    )
    embed_dim: int = option(
        128, "Embedding size of the student (and of a teacher trained here); --distill compat needs the teacher's.",
        section="model", **_TEACHER,
    )
    # data
    data: str = option(
        "synthetic", "Data set: synthetic (embedded default), digits, or NAME:PATH, e.g. market1501:/data/Market-1501.",
        section="data", shared=True,
    )
    image_size: tuple[int, int] | None = option(  # None: chosen from the data set (distill.data.inputs)
        None, "Input size HxW, e.g. 64x32 or 256x128, or auto.", section="data", shared=True,
        shown="auto: chosen from the data set", cli_type=str, metavar="HxW", **_TEACHER,
    )
    augment: str | None = option(
        None, "Training augmentation preset: none, light or standard.",
        section="data", shown="chosen from the data set", **_TEACHER,
    )
    flip: bool | None = option(
        None, "Random horizontal flip in training.", section="data",
        shown="on for the 'standard' augmentation preset only", **_TEACHER,
    )
    val_fraction: float = option(
        0.2, "Training identities held out for validation, best checkpoints and the teacher gate (0 = off).",
        section="data", **_TEACHER,
    )
    strict: bool = option(False, "Fail on unreadable images instead of skipping them.", section="data", shared=True)
    cuhk03_variant: str | None = option(
        None, "cuhk03 only: labeled or detected boxes.", section="data", shared=True, shown="labeled"
    )
    bbox_crop: bool | None = option(None, "cub200 only: crop to the bounding boxes.", section="data", shared=True, shown="false")
    split_file: str | None = option(
        None, "imagefolder only: explicit train/test split file.", section="data", shared=True, shown="none"
    )
    unlabeled: str | None = option(
        None, "Images without labels the distilled student also learns from, through the teacher's distillation terms "
        "only: a folder (searched recursively) or a data spec (its training images, labels ignored).",
        section="data", shown="none", **_STUDENT,
    )
    unlabeled_batch: int | None = option(
        None, "Unlabeled images added to every training batch of the distilled student.", section="data",
        shown="--batch-size", **_STUDENT,
    )
    unlabeled_only: bool = option(
        False, "Train the distilled student on the --unlabeled images alone (a finished teacher, no task losses); "
        "--data only evaluates (--data none: no test set).", section="data", **_STUDENT,
    )
    # training (students; the teacher uses teacher_epochs and teacher_lr). A length given (epochs or
    # steps) runs as given; left unset, it is DEFAULT_EPOCHS (or DEFAULT_TEACHER_EPOCHS) raised to at
    # least min_steps (teacher_min_steps), so small sets train enough.
    epochs: int | None = option(
        None, "Student epochs, run as given.", section="training",
        shown=f"{DEFAULT_EPOCHS}, raised to --min-steps on small data sets", **_STUDENT,
    )
    teacher_epochs: int | None = option(
        None, "Teacher epochs when it is trained here, run as given.",
        section="training", shared=True, shown=f"{DEFAULT_TEACHER_EPOCHS}, raised to --teacher-min-steps on small data sets", **_TEACHER,
    )
    steps: int | None = option(
        None, "Student optimiser steps, rounded up to whole epochs, run as given (overrides --epochs).",
        section="training", shown="from --epochs", **_STUDENT,
    )
    teacher_steps: int | None = option(
        None, "Teacher optimiser steps, run as given (overrides --teacher-epochs).", section="training",
        shown="from --teacher-epochs", **_TEACHER,
    )
    min_steps: int = option(
        150, "The default student length (no --epochs/--steps) is raised to at least this many steps.",
        section="training", **_STUDENT,
    )
    teacher_min_steps: int = option(
        300, "The default teacher length (no --teacher-epochs/--teacher-steps) is raised to at least this many steps.",
        section="training", **_TEACHER,
    )
    batch_size: int = option(64, "Batch size (P identities x K images); fitted to the identities there are.", section="training", **_TEACHER)
    images_per_id: int = option(4, "K, images per identity in a batch.", section="training", **_TEACHER)
    sampler: str = option(
        "pk", "Batches: pk (P x K) or importance (Deep Ranking's online importance sampling).", section="training", **_TEACHER
    )
    lr: float = option(3e-3, "Student learning rate (AdamW, one-cycle schedule with warm-up).", section="training", above=0.0, **_STUDENT)
    teacher_lr: float = option(5e-3, "Teacher learning rate.", section="training", shared=True, above=0.0, **_TEACHER)
    weight_decay: float = option(5e-4, "AdamW weight decay.", section="training", at_least=0.0, **_TEACHER)
    loss: str = option(
        "softmax=1,triplet=1", "Task losses with weights, e.g. softmax=1,triplet=1,lifted=0.5 (see `distill list`).",
        section="training", **_TEACHER,
    )
    loss_options: dict[str, Any] = option(  # hparams of the task losses (distill.losses.task.HPARAMS)
        help="Task-loss hyper-parameter KEY=VALUE (repeatable), e.g. triplet_margin=0.3.", factory=dict,
        section="training", flag="--loss-opt", shown="none", cli_type=list[str], metavar="KEY=VALUE", **_TEACHER,
    )
    # distillation
    distill: str = option(  # kd=3: 6 seeds on the default data: +0.047 R@1 / +0.053 mAP over the baseline (kd=1:
        # +0.027 / +0.031); darkrank=0.02: full-list hard DarkRank sums ~N log N terms per query (~20 at batch 64)
        "kd=3,darkrank=0.02", "Distillation terms with weights, e.g. kd=3,darkrank=0.02,pkt=1, or none (see `distill list`).",
        section="distillation", **_STUDENT,
    )
    kd_temperature: float = option(4.0, "KD temperature T.", section="distillation", above=0.0, **_STUDENT)
    darkrank: str = option("hard", "DarkRank mode: hard or soft.", section="distillation", **_STUDENT)
    darkrank_alpha: float = option(
        3.0, "DarkRank score scale alpha in S = -alpha * ||q - x||^beta.", section="distillation", above=0.0, **_STUDENT
    )
    darkrank_beta: float = option(3.0, "DarkRank distance power beta.", section="distillation", above=0.0, **_STUDENT)
    darkrank_list_size: int | None = option(  # None ("all"): every other sample, as the paper (measured best, README)
        None, "Candidates per query: the teacher's M nearest, or all (every other sample, the paper).",
        section="distillation", shown="all", kind="an integer or 'all'", cli_type=str, metavar="INT", **_STUDENT,
    )
    darkrank_topk: int | None = option(
        None, "Hard DarkRank only: ListMLE@k, the teacher's first k picks over the whole list.", section="distillation",
        shown="off: ListMLE over the whole list", **_STUDENT,
    )
    darkrank_method: str = option(
        "exact", "Soft DarkRank: exact, bruteforce, sampled or sampled_prefix.", section="distillation", **_STUDENT
    )
    darkrank_samples: int = option(
        128, "Soft DarkRank, sampled methods: teacher rankings drawn per query.", section="distillation", **_STUDENT
    )
    baseline: bool = option(
        True, "Also train the student without distillation (what distillation has to beat).", section="distillation",
        stage="report", **_OUTPUT_ONLY,
    )
    require_better_teacher: bool = option(
        False, "Fail (exit 1) when the teacher is not clearly better than the student alone on validation.",
        section="distillation", stage="report", off_flag="--allow-weaker-teacher", trains=False,
    )
    gate_margin: float = option(
        0.02, "How much better the teacher must score on validation.", section="distillation", stage="report",
        at_least=0.0, trains=False,
    )
    # export and report
    clustering: bool = option(  # turn off for ~10k classes (SOP) without faiss
        True, "NMI/F1 by k-means (slow for ~10k classes without faiss).", section="export and report", stage="evaluate",
        trains=False,
    )
    export_precision: str = option(
        "fp32", "ONNX precisions, comma-separated: " + ", ".join(PRECISIONS) + ".", section="export and report",
        stage="report", kind="a string or a list of strings", **_OUTPUT_ONLY,
    )
    target_accuracy: float = option(
        0.9, "Share of the teacher's accuracy a student should keep (the report says which comes closest).",
        section="export and report", stage="report", trains=False,
    )
    bench_iters: int = option(30, "Timed iterations per benchmark round.", section="export and report", stage="report", **_OUTPUT_ONLY)
    # run
    device: str = option("auto", "auto, cpu or cuda[:N].", section="run", shared=True, trains=False)
    seed: int = option(
        0, "Random seed (the same seed and thread count give the same files on CPU).", section="run", shared=True, **_TEACHER
    )
    amp: bool = option(True, "bf16 autocast on GPU.", section="run")
    compile: bool = option(False, "torch.compile the models.", section="run", trains=False)
    workers: int | None = option(
        None, "Data-loader worker processes.", section="run", shown="from the device and cores", trains=False
    )
    resume: bool = option(
        False, "Continue interrupted training from checkpoints (refused when they were made with other settings or data).",
        section="run", shared=True, **_OUTPUT_ONLY,
    )
    fresh: bool = option(
        False, "Start training over although an unfinished checkpoint exists (it is kept until the new run passes it).",
        section="run", shared=True, **_OUTPUT_ONLY,
    )
    keep_checkpoints: bool = option(
        False, "Keep each training's resumable checkpoint (*.ckpt) after its model file is written (deleted by default: they are large).",
        section="run", shared=True, **_OUTPUT_ONLY,
    )
    gather_embeddings: bool = option(
        False, "Under torchrun: all-gather embeddings, labels and teacher outputs so triplet/DarkRank/RKD span the global batch.",
        section="run",
    )
    name: str = option("default", "Run name (output directory runs/<name> unless --out).", section="run", shared=True, **_OUTPUT_ONLY)
    out: str | None = option(None, "Output directory.", section="run", shared=True, shown="runs/<name>", **_OUTPUT_ONLY)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name

    def data_options(self) -> dict[str, Any]:
        """Options for the data-set loader: ``strict`` plus the loader-specific ones that are set."""
        opts = {"cuhk03_variant": self.cuhk03_variant, "bbox_crop": self.bbox_crop, "split_file": self.split_file}
        return {"strict": self.strict} | {k: v for k, v in opts.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size) if self.image_size is not None else None
        return d


def fields_where(flag: str, value: Any = True) -> tuple[str, ...]:
    """Names of the Config fields whose metadata ``flag`` is ``value``, in field order, e.g.
    ``fields_where("shapes_teacher")`` or ``fields_where("section", "data")``."""
    return tuple(f.name for f in fields(Config) if f.metadata[flag] == value)


def teacher_fields() -> tuple[str, ...]:
    """The fields that shape a teacher trained here: a cached ``<out>/teacher.pt`` is reused only when
    all of them (and the training data) match."""
    return fields_where("shapes_teacher")


def command_fields(command: str) -> tuple[str, ...]:
    """The fields a command reads (``COMMAND_STAGES``): those of its last stage and the stages before."""
    last = STAGES.index(COMMAND_STAGES[command])
    return tuple(f.name for f in fields(Config) if STAGES.index(f.metadata["stage"]) <= last)


def field_info(name: str) -> dict[str, Any]:
    """The metadata of Config field ``name`` (its help, section, stage, flags: see :func:`option`)."""
    return dict(_FIELDS[name].metadata)


def default_value(name: str) -> Any:
    """Field ``name``'s default (a fresh one for fields with a factory)."""
    f = _FIELDS[name]
    return f.default if f.default is not MISSING else f.default_factory()


_FIELDS = {f.name: f for f in fields(Config)}


def student_specs(cfg: Config) -> list[tuple[str, float]]:
    """The students of a run as ``(name, width)``: ``cfg.students`` if set, else ``cfg.student`` split at
    commas; ``NAME@WIDTH`` sets the width multiplier, a bare builtin ``NAME`` takes ``cfg.student_width``
    and a bare library model (``timm:NAME``, whose name sets its size) width 1."""
    items = cfg.students if cfg.students is not None else cfg.student.split(",")
    if isinstance(items, str) or not items:
        raise DistillError(f"students must be a non-empty list of specs like ['nin_bn@0.5'], got {items!r}")
    specs = []
    for item in items:
        name, at, width = str(item).strip().partition("@")
        try:
            w = float(width) if at else (1.0 if ":" in name else cfg.student_width)
        except ValueError:
            w = -1.0
        if not name or not (w > 0 and math.isfinite(w)):
            raise DistillError(f"student spec '{item}' must be NAME or NAME@WIDTH with a finite WIDTH > 0, e.g. nin_bn@0.5")
        specs.append((name, w))
    if len(set(specs)) != len(specs):
        raise DistillError(f"the same student is listed twice in {', '.join(map(str, items))}")
    return specs


def export_precisions(cfg: Config) -> list[str]:
    """``cfg.export_precision`` as a list (comma-separated), in the order given, each checked."""
    wanted = [p.strip() for p in cfg.export_precision.split(",")]
    bad = [p for p in wanted if p not in PRECISIONS]
    if bad or len(set(wanted)) != len(wanted):
        raise DistillError(
            f"export_precision must be a comma-separated list of distinct {', '.join(PRECISIONS)}, got '{cfg.export_precision}'"
        )
    return wanted


DARKRANK_MODES = ("hard", "soft")
# options replaced by --distill, with the term each weighed and its old default: old files and commands
# fail with the spec that means what they said
REPLACED_WEIGHTS = {
    "kd_weight": ("kd", 3.0), "darkrank_weight": ("darkrank", 0.02), "rkd_distance_weight": ("rkd_distance", 0.0),
    "rkd_angle_weight": ("rkd_angle", 0.0), "pkt_weight": ("pkt", 0.0), "regression_weight": ("regression", 0.0),
    "compat_weight": ("compat", 0.0),
}
DARKRANK_METHODS = ("exact", "bruteforce", "sampled", "sampled_prefix")
SAMPLERS = ("pk", "importance")
AUGMENT_PRESETS = ("none", "light", "standard")


def _coerce(name: str, value: Any) -> Any:
    """Bring a TOML/CLI value to the field's type (tuples from lists or ``HxW`` strings)."""
    if name == "image_size":
        if value is None or (isinstance(value, str) and value.lower() == "auto"):
            return None
        if isinstance(value, str):
            parts = value.lower().split("x")
            value = parts if len(parts) == 2 else [value]
        try:
            h, w = (int(v) for v in value)
        except (TypeError, ValueError):
            raise DistillError(f"image_size must be HxW like 64x32, got {value!r}") from None
        if h < 16 or w < 16:
            raise DistillError(f"image_size {h}x{w} is too small (at least 16x16)")
        return (h, w)
    if name == "darkrank_list_size" and isinstance(value, str):
        if value.strip().lower() == "all":
            return None
        if not value.strip().isdigit():
            raise DistillError(f"darkrank_list_size must be an integer or 'all' (every other sample), got {value!r}")
        return int(value)
    if name == "export_precision" and isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if name == "loss_options" and isinstance(value, (list, tuple)):
        return dict(_key_value(item) for item in value)
    return value


def _key_value(item: str) -> tuple[str, Any]:
    """``"triplet_margin=0.3"`` -> ``("triplet_margin", 0.3)``; values parsed as TOML scalars."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise DistillError(f"--loss-opt takes KEY=VALUE, got '{item}'")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as semihard
    return key.strip(), value


def validate(cfg: Config) -> Config:
    """Check option values and combinations; raise one clear ``DistillError`` for the first bad one."""
    for f in fields(cfg):  # a Config built in Python is checked like one read from a file
        check_type(f.name, getattr(cfg, f.name))
    if cfg.darkrank == "none":
        _replaced({"darkrank": "none"})
    if cfg.darkrank not in DARKRANK_MODES:
        raise DistillError(f"--darkrank must be one of {', '.join(DARKRANK_MODES)}, got '{cfg.darkrank}'")
    if cfg.sampler not in SAMPLERS:
        raise DistillError(f"--sampler must be one of {', '.join(SAMPLERS)}, got '{cfg.sampler}'")
    if cfg.darkrank_method not in DARKRANK_METHODS:
        raise DistillError(f"--darkrank-method must be one of {', '.join(DARKRANK_METHODS)}, got '{cfg.darkrank_method}'")
    if cfg.augment is not None and cfg.augment not in AUGMENT_PRESETS:
        raise DistillError(f"--augment must be one of {', '.join(AUGMENT_PRESETS)}, got '{cfg.augment}'")
    for name in ("epochs", "teacher_epochs", "steps", "teacher_steps", "min_steps", "teacher_min_steps"):
        value = getattr(cfg, name)  # a TOML file or recipe can give 2.5
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise DistillError(f"{name} must be an integer, got {value!r}")
    for name in ("epochs", "teacher_epochs", "batch_size", "images_per_id", "embed_dim", "bench_iters"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise DistillError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("steps", "teacher_steps", "min_steps", "teacher_min_steps"):
        value = getattr(cfg, name)
        if value is not None and value < (0 if name.startswith(("min", "teacher_min")) else 1):
            raise DistillError(f"{name} must be >= {0 if 'min' in name else 1}, got {value}")
    if not 0 <= cfg.val_fraction < 1:
        raise DistillError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.batch_size % cfg.images_per_id or cfg.batch_size // cfg.images_per_id < 2:
        raise DistillError(
            f"batch_size {cfg.batch_size} must be a multiple of images_per_id {cfg.images_per_id} "
            "with at least 2 identities per batch (P x K sampling)"
        )
    if cfg.darkrank_list_size is not None and not 2 <= cfg.darkrank_list_size < cfg.batch_size:
        raise DistillError(
            f"darkrank_list_size must be in [2, batch_size) or 'all' (every other sample), got {cfg.darkrank_list_size}"
        )
    candidates = cfg.batch_size - 1 if cfg.darkrank_list_size is None else cfg.darkrank_list_size
    if cfg.darkrank_topk is not None:
        if cfg.darkrank != "hard":
            raise DistillError(f"--darkrank-topk is ListMLE@k, a hard DarkRank option: use --darkrank hard or unset it (got --darkrank {cfg.darkrank})")
        if not 1 <= cfg.darkrank_topk <= candidates:
            raise DistillError(f"darkrank_topk must be in [1, {candidates}] (the candidates per query), got {cfg.darkrank_topk}")
    if cfg.darkrank_samples < 1:
        raise DistillError(f"darkrank_samples must be >= 1, got {cfg.darkrank_samples}")
    if cfg.darkrank == "soft" and "darkrank" in distill_terms(cfg) and cfg.darkrank_method not in ("sampled", "sampled_prefix"):
        limit = 20 if cfg.darkrank_method == "exact" else 9
        if candidates > limit:
            given = (
                f"--darkrank-list-size {candidates}" if cfg.darkrank_list_size is not None
                else f"--darkrank-list-size all ({candidates} candidates in a batch of {cfg.batch_size})"
            )
            raise DistillError(
                f"soft DarkRank with method {cfg.darkrank_method} handles lists of at most {limit} candidates, "
                f"got {given}: use a --darkrank-list-size <= {limit} or --darkrank-method sampled_prefix"
            )
    for f in fields(cfg):  # the numbers with a lower bound (``above`` or ``at_least`` in their metadata)
        strict = f.metadata["above"] is not None
        low = f.metadata["above"] if strict else f.metadata["at_least"]
        if low is None:
            continue
        name, value = f.name, getattr(cfg, f.name)
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise DistillError(f"{name} (--{name.replace('_', '-')}) must be {'>' if strict else '>='} {low:g}, got {value:g}")
    if cfg.resume and cfg.fresh:
        raise DistillError("--resume continues the checkpoints, --fresh starts over without them: give one of them")
    _check_losses(cfg)
    student_specs(cfg)
    export_precisions(cfg)
    validate_unlabeled(cfg)
    if not 0 < cfg.target_accuracy <= 1:
        raise DistillError(f"target_accuracy is a share of the teacher's accuracy in (0, 1], got {cfg.target_accuracy}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise DistillError(f"--device must be auto, cpu, cuda or cuda:N (N a GPU index), got '{cfg.device}'")
    if not 0 <= cfg.seed < 2**32:
        raise DistillError(f"--seed must be in [0, 2^32), got {cfg.seed}")
    if cfg.workers is not None and cfg.workers < 0:
        raise DistillError(f"--workers must be >= 0, got {cfg.workers}")
    return cfg


def distill_terms(cfg: Config) -> dict[str, float]:
    """The ``--distill`` terms that are on (weight > 0), checked against the registry."""
    from distill.losses.registry import parse_spec  # losses import torch: only when the config is checked

    return {name: weight for name, weight in parse_spec(cfg.distill, "distill") if weight}


def label_free(cfg: Config) -> bool:
    """True when the distilled student learns from the unlabeled images alone (no labeled training)."""
    return cfg.unlabeled_only or cfg.data == "none"


def validate_unlabeled(cfg: Config) -> None:
    """The unlabeled-image options and their combinations."""
    if cfg.unlabeled_batch is not None and cfg.unlabeled_batch < 1:
        raise DistillError(f"unlabeled_batch must be >= 1, got {cfg.unlabeled_batch}")
    if label_free(cfg) and not cfg.unlabeled:
        why = "--data none" if cfg.data == "none" else "--unlabeled-only"
        raise DistillError(f"{why} trains on unlabeled images only: give them with --unlabeled DIR")
    if label_free(cfg) and not distill_terms(cfg):
        raise DistillError(
            f"{'--data none' if cfg.data == 'none' else '--unlabeled-only'} trains the student through the distillation "
            f"terms alone, and --distill is {cfg.distill!r}: give some, e.g. --distill kd=3,darkrank=0.02"
        )
    if label_free(cfg) and cfg.sampler != "pk":
        raise DistillError("--sampler importance needs labels: drop it for a run on unlabeled images alone")


def _archs_from_weights(values: dict[str, Any]) -> dict[str, Any]:
    """``teacher``/``student`` (with its width) taken from a distill model file given as their weights
    when they are not set: the file records its architecture, so it need not be repeated."""
    from distill.models.file import recorded_arch  # models import torch: only when weights are given

    found: dict[str, Any] = {}
    for role in ("teacher", "student"):
        path = values.get(f"{role}_weights")
        if not path or role in values or (role == "student" and "students" in values):
            continue
        arch = recorded_arch(path)
        if arch is not None:
            found[role] = arch[0] if role == "teacher" or ":" in arch[0] else f"{arch[0]}@{arch[1]:g}"
    return found


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing, unreadable, non-UTF-8 or malformed file is one clear line."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DistillError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise DistillError(f"{what} {path} is a directory, not a TOML file") from None
    except UnicodeDecodeError as err:
        raise DistillError(f"{what} {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    except OSError as err:
        raise DistillError(f"cannot read {what} {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise DistillError(f"{what} {path} is not valid TOML: {err}") from None


def _check_losses(cfg: Config) -> None:
    """``--loss`` and ``--loss-opt`` checked now, not when the first student starts training; a loss
    that compares images of one identity needs at least two per identity in a P x K batch."""
    from distill.losses.registry import entries
    from distill.losses.task import check_task_loss

    distill_terms(cfg)

    terms, _ = check_task_loss(cfg.loss, cfg.loss_options)
    blind = [name for name, weight in terms if weight and "positives" in entries("task")[name].needs]
    if blind and cfg.sampler == "pk" and cfg.images_per_id < 2:
        raise DistillError(
            f"--images-per-id {cfg.images_per_id} puts one image of each identity in a batch, so {', '.join(blind)} "
            f"never sees a positive pair and is always 0: use --images-per-id 2 or more, or a --loss without it"
        )


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Defaults <- TOML file (flat keys, or a ``[run]`` table) <- overrides that are not None.

    Every value, from the file or the command line, is type-checked against its ``Config`` field
    (``check_type``) before any range or combination is checked (``validate``)."""
    values: dict[str, Any] = {}
    if path is not None:
        data = read_toml(path, "config file")
        table = data.get("run", data)
        if not isinstance(table, dict):
            raise DistillError(f"config file {path}: run must be a table of Config keys ([run]), got {table!r}")
        try:
            values.update({k: check_type(k, v) for k, v in _known(table).items()})
        except DistillError as err:
            raise DistillError(f"config file {path}: {err}") from None
    values.update({k: check_type(k, v) for k, v in _known(overrides).items() if v is not None})
    values |= _archs_from_weights(values)
    if "student" in values and "students" in values:
        raise DistillError("give either student (one spec or a comma-separated list) or students (a list), not both")
    return validate(Config(**values))


def _known(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` when every key is a Config field, else one error naming the unknown ones (or the
    option that replaced them)."""
    _replaced(values)
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DistillError(f"unknown config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return values


def _replaced(values: dict[str, Any]) -> None:
    """One error for options ``--distill`` replaced (a weight per term, ``darkrank = "none"``), naming the
    spec that means what they said (the old defaults: kd 3, hard DarkRank 0.02)."""
    old = [k for k in values if k in REPLACED_WEIGHTS] + (["darkrank"] if values.get("darkrank") == "none" else [])
    if not old:
        return
    weights = {term: values.get(key, default) for key, (term, default) in REPLACED_WEIGHTS.items()}
    if values.get("darkrank") == "none":
        weights["darkrank"] = 0
    spec = ",".join(f"{term}={w:g}" if isinstance(w, (int, float)) else f"{term}={w}" for term, w in weights.items() if w) or "none"
    names = ", ".join('darkrank = "none"' if k == "darkrank" else k for k in old)
    raise DistillError(
        f"{names} {'was' if len(old) == 1 else 'were'} replaced by --distill: use --distill {spec} "
        f"(in a TOML file: distill = \"{spec}\")"
    )


def option_name(name: str) -> str:
    """How errors name a field: ``lr (--lr)``; TOML-only fields (``students``) by their key alone."""
    if not _FIELDS[name].metadata["cli"]:
        return name
    return f"{name} ({flag_name(name)})"


def flag_name(name: str) -> str:
    """The command-line option of field ``name``: ``--lr``, ``--loss-opt`` for ``loss_options``."""
    return _FIELDS[name].metadata["flag"] or "--" + name.replace("_", "-")


# what a value of each field type must be, and the Python types that are that
_TYPES: dict[str, tuple[str, tuple[type, ...]]] = {
    "bool": ("true or false", (bool,)),
    "int": ("an integer", (int,)),
    "float": ("a number", (int, float)),
    "str": ("a string", (str,)),
    "list[str]": ("a list of strings", (list,)),
    "dict[str, Any]": ("a table of KEY = VALUE (e.g. triplet_margin = 0.3)", (dict,)),
    "tuple[int, int]": ("HxW like 64x32", (tuple,)),
}


def check_type(name: str, value: Any) -> Any:
    """``value`` (from TOML, the command line or a recipe) brought to field ``name``'s type by
    ``_coerce``, or one clear error: ``epochs = "three"``, ``resume = "no"`` or ``darkrank_list_size
    = 2.5`` are refused here, never taken as true or crashing later."""
    value = _coerce(name, value)
    kind = str(_FIELDS[name].type)
    base, _, optional = kind.partition(" | ")
    what, types = _TYPES[base]
    ok = (value is None and optional == "None") or (isinstance(value, types) and not (isinstance(value, bool) and bool not in types))
    if ok and base == "list[str]" and value is not None:
        ok = all(isinstance(item, str) for item in value)
    if not ok:
        raise DistillError(f"{option_name(name)} must be {_FIELDS[name].metadata['kind'] or what}, got {value!r}")
    return float(value) if base == "float" and value is not None else value
