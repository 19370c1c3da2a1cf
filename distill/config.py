"""One typed config for a run: defaults, then a TOML file, then command-line overrides."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from distill.errors import DistillError


@dataclass
class Config:
    """Everything ``distill run`` needs. The defaults run the embedded data set in a few CPU minutes."""

    # models
    teacher: str = "inception_bn"
    teacher_weights: str | None = None
    student: str = "nin_bn"  # one spec or a comma-separated list; NAME@WIDTH sets that student's width
    students: list[str] | None = None  # the same list as a TOML array (give student or students, not both)
    student_width: float = 0.5  # full-width NIN-BN costs only 1.6x fewer FLOPs than BN-Inception
    multiscale: bool = False
    embed_dim: int = 128
    # data
    data: str = "synthetic"
    image_size: tuple[int, int] = (64, 32)
    strict: bool = False
    cuhk03_variant: str | None = None  # cuhk03 only: labeled | detected
    bbox_crop: bool | None = None  # cub200 only: crop to the published bounding boxes
    split_file: str | None = None  # imagefolder only: explicit train/test split file
    # training (students; the teacher uses teacher_epochs and teacher_lr)
    epochs: int = 12
    teacher_epochs: int = 24  # 16 left BN-Inception under-trained: R@1 0.74-0.85 run to run vs 0.885-0.893 at 24
    batch_size: int = 64
    images_per_id: int = 4
    sampler: str = "pk"  # pk (P x K batches) | importance (Deep Ranking's online importance sampling)
    lr: float = 3e-3
    teacher_lr: float = 5e-3
    weight_decay: float = 5e-4
    loss: str = "softmax=1,triplet=1"
    loss_options: dict[str, Any] = field(default_factory=dict)  # hparams of the task losses (distill.losses.task.HPARAMS)
    # distillation
    kd_weight: float = 3.0  # 6 seeds on the default data: +0.047 R@1 / +0.053 mAP over the baseline (1.0: +0.027 / +0.031)
    kd_temperature: float = 4.0
    darkrank: str = "hard"
    darkrank_weight: float = 0.1  # hard DarkRank sums ~N log N terms per query: keep it near the task losses
    darkrank_alpha: float = 3.0
    darkrank_beta: float = 3.0
    darkrank_list_size: int | None = None  # None: the teacher's 8 nearest (the informative head of the ranking)
    darkrank_method: str = "exact"
    baseline: bool = True
    # evaluation
    clustering: bool = True  # NMI/F1 by k-means; turn off for ~10k classes (SOP) without faiss
    # engine
    device: str = "auto"
    seed: int = 0
    amp: bool = True
    compile: bool = False
    workers: int | None = None
    resume: bool = False
    # outputs
    name: str = "default"
    out: str | None = None
    export_precision: str = "fp32"  # comma-separated list of fp32, fp16, int8, int8-static
    target_accuracy: float = 0.9  # share of the teacher's accuracy a student should keep (report)
    bench_iters: int = 30

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name

    def data_options(self) -> dict[str, Any]:
        """Options for the data-set loader: ``strict`` plus the loader-specific ones that are set."""
        opts = {"cuhk03_variant": self.cuhk03_variant, "bbox_crop": self.bbox_crop, "split_file": self.split_file}
        return {"strict": self.strict} | {k: v for k, v in opts.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


PRECISIONS = ("fp32", "fp16", "int8", "int8-static")


def student_specs(cfg: Config) -> list[tuple[str, float]]:
    """The students of a run as ``(name, width)``: ``cfg.students`` if set, else ``cfg.student`` split at
    commas; ``NAME@WIDTH`` sets the width multiplier, a bare ``NAME`` takes ``cfg.student_width``."""
    items = cfg.students if cfg.students is not None else cfg.student.split(",")
    if isinstance(items, str) or not items:
        raise DistillError(f"students must be a non-empty list of specs like ['nin_bn@0.5'], got {items!r}")
    specs = []
    for item in items:
        name, at, width = str(item).strip().partition("@")
        try:
            w = float(width) if at else cfg.student_width
        except ValueError:
            w = -1.0
        if not name or not w > 0:
            raise DistillError(f"student spec '{item}' must be NAME or NAME@WIDTH with WIDTH > 0, e.g. nin_bn@0.5")
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


DARKRANK_MODES = ("hard", "soft", "none")
DARKRANK_METHODS = ("exact", "bruteforce", "sampled")
SAMPLERS = ("pk", "importance")


def _coerce(name: str, value: Any) -> Any:
    """Bring a TOML/CLI value to the field's type (tuples from lists or ``HxW`` strings)."""
    if name == "image_size":
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
    if cfg.darkrank not in DARKRANK_MODES:
        raise DistillError(f"--darkrank must be one of {', '.join(DARKRANK_MODES)}, got '{cfg.darkrank}'")
    if cfg.sampler not in SAMPLERS:
        raise DistillError(f"--sampler must be one of {', '.join(SAMPLERS)}, got '{cfg.sampler}'")
    if cfg.darkrank_method not in DARKRANK_METHODS:
        raise DistillError(f"--darkrank-method must be one of {', '.join(DARKRANK_METHODS)}, got '{cfg.darkrank_method}'")
    for name in ("epochs", "teacher_epochs", "batch_size", "images_per_id", "embed_dim", "bench_iters"):
        if getattr(cfg, name) < 1:
            raise DistillError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.batch_size % cfg.images_per_id or cfg.batch_size // cfg.images_per_id < 2:
        raise DistillError(
            f"batch_size {cfg.batch_size} must be a multiple of images_per_id {cfg.images_per_id} "
            "with at least 2 identities per batch (P x K sampling)"
        )
    if cfg.darkrank_list_size is not None and not 2 <= cfg.darkrank_list_size < cfg.batch_size:
        raise DistillError(f"darkrank_list_size must be in [2, batch_size), got {cfg.darkrank_list_size}")
    if cfg.darkrank_list_size is None:
        cfg.darkrank_list_size = min(8, cfg.batch_size - 1)
    if cfg.darkrank == "soft" and cfg.darkrank_method != "sampled":
        limit = 20 if cfg.darkrank_method == "exact" else 9
        if cfg.darkrank_list_size > limit:
            raise DistillError(
                f"soft DarkRank with method {cfg.darkrank_method} handles lists of at most {limit} candidates, "
                f"got --darkrank-list-size {cfg.darkrank_list_size}: lower it or use --darkrank-method sampled"
            )
    if cfg.student_width <= 0:
        raise DistillError(f"student_width must be > 0, got {cfg.student_width}")
    student_specs(cfg)
    export_precisions(cfg)
    if not 0 < cfg.target_accuracy <= 1:
        raise DistillError(f"target_accuracy is a share of the teacher's accuracy in (0, 1], got {cfg.target_accuracy}")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise DistillError(f"--device must be auto, cpu or cuda[:N], got '{cfg.device}'")
    return cfg


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Defaults <- TOML file (flat keys, or a ``[run]`` table) <- overrides that are not None."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise DistillError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as err:
            raise DistillError(f"config file {path} is not valid TOML: {err}") from None
        values.update(data.get("run", data))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "student" in values and "students" in values:
        raise DistillError("give either student (one spec or a comma-separated list) or students (a list), not both")
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DistillError(f"unknown config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return validate(Config(**{k: _coerce(k, v) for k, v in values.items()}))
