"""One typed config for a run: the ``Config`` fields with their defaults, help and what the code needs
to know about each (``option``), and the helpers that read that metadata. Loading and checking a
config (TOML file, command-line overrides) is ``distill.config_load``."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable


PRECISIONS = ("fp32", "fp16", "int8", "int8-static")  # the ONNX precisions export writes
DEFAULT_EPOCHS = 12  # student epochs when neither --epochs nor --steps is given
DEFAULT_TEACHER_EPOCHS = 24  # 16 left BN-Inception under-trained: R@1 0.74-0.85 run to run vs 0.885-0.893 at 24
# with the 'standard' augmentation (random crops, flips, erasing: re-ID, CUB, Cars, SOP) every pass
# shows other views: 24 epochs left CUHK03's BN-Inception at rank-1 0.18, 56 reached 0.32
# (docs/results.md); re-ID recipes train 60-120 epochs
AUGMENTED_TEACHER_EPOCHS = 60
# the students' default under that augmentation: at 12 epochs CUHK03's students were still rising; 24
# raised both the student alone and the distilled one (docs/results.md)
AUGMENTED_EPOCHS = 24

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
        "only: a folder (searched recursively) or a data spec (its training images, labels ignored). The default "
        "length passes over them as often as over the labeled images.",
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
    # steps) runs as given; left unset, it is DEFAULT_EPOCHS (or DEFAULT_TEACHER_EPOCHS; AUGMENTED_* with
    # the 'standard' augmentation) raised to at
    # least min_steps (teacher_min_steps), so small sets train enough.
    epochs: int | None = option(
        None, "Student epochs, run as given.", section="training",
        shown=f"{DEFAULT_EPOCHS} ({AUGMENTED_EPOCHS} with --augment standard), raised to --min-steps on small data sets", **_STUDENT,
    )
    teacher_epochs: int | None = option(
        None, "Teacher epochs when it is trained here, run as given.",
        section="training", shared=True, shown=f"{DEFAULT_TEACHER_EPOCHS} ({AUGMENTED_TEACHER_EPOCHS} with --augment standard), raised to --teacher-min-steps on small data sets", **_TEACHER,
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
    retry_lr: bool = option(
        True, "A student that has not learnt (kept validation score not clearly above the untrained model's) is trained "
        "once more from the start at a third of --lr; both trainings are in the report.", section="training", **_STUDENT,
    )
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
    distill_scale: str = option(
        "fixed", "How the --distill weights are read: fixed (loss weights) or gradient (each is the ratio of the term's "
        "gradient norm to the task loss's, measured on the first batches: the same pull on every data set).",
        section="distillation", **_STUDENT,
    )
    mix_rows: int | None = option(  # the batch's size: 5 seeds on CUHK03 +0.037 mAP [+0.025, +0.049] over the student
        # alone (half the batch: +0.025 [-0.001, +0.051]); the embedded set and digits gain more, Yale less (docs/results.md)
        None, "Mixed images added to each batch of the distilled student: each a pixel mix of two images of the batch, "
        "scored by the teacher on that view and learnt through the distillation terms only (function matching, "
        "Beyer et al. 2022). 0: off.", section="distillation", at_least=0, shown="as many as --batch-size", **_STUDENT,
    )
    kd_temperature: float = option(  # 1 (function matching's) against 4, on the same seeds: Yale +0.051 mAP
        # [+0.003, +0.098] and digits +0.024 (10 seeds), CUHK03 +0.007 and embedded +0.006 (5; docs/results.md)
        1.0, "KD temperature T.", section="distillation", above=0.0, **_STUDENT
    )
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
    amp: bool | None = option(
        None, "Train under bf16 autocast (faster on GPUs and on CPUs with native bf16; other float rounding).",
        section="run", shown="on with CUDA; on a CPU with native bf16 (AMX, AVX512-BF16) from 128x64 inputs", shapes_teacher=True,
    )
    channels_last: bool | None = option(
        None, "Train in channels_last memory format (faster convolutions on GPUs and on some CPUs; other float rounding).",
        section="run", shown="on with CUDA; on a CPU from 128x64 inputs", shapes_teacher=True,
    )
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
    keep_comparison_files: bool = option(
        False, "Keep the files made only to score the report's comparison rows (the teacher's ONNX export, each "
        "baseline's model file and ONNX exports); removed once the report is written unless the verdict ships one.",
        section="run", stage="report", **_OUTPUT_ONLY,
    )
    keep_checkpoints: bool = option(
        False, "Keep each training's resumable checkpoint (*.ckpt) after its model file is written, and the teacher-output "
        "cache (cache/) after the run (deleted by default: they are large).",
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


def field_type(name: str) -> str:
    """Field ``name``'s type as written in ``Config``, e.g. ``"int | None"``."""
    return str(_FIELDS[name].type)


def default_value(name: str) -> Any:
    """Field ``name``'s default (a fresh one for fields with a factory)."""
    f = _FIELDS[name]
    return f.default if f.default is not MISSING else f.default_factory()


_FIELDS = {f.name: f for f in fields(Config)}


def flag_name(name: str) -> str:
    """The command-line option of field ``name``: ``--lr``, ``--loss-opt`` for ``loss_options``."""
    return _FIELDS[name].metadata["flag"] or "--" + name.replace("_", "-")
