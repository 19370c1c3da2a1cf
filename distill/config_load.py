"""Reading and checking a ``Config``: defaults, then a TOML file, then command-line overrides, each
value type-checked against its field, then ranges and combinations; and what the checked values
mean (the students, the ``--distill`` terms, the export precisions)."""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from distill.config import PRECISIONS, Config, field_info, field_type, flag_name
from distill.errors import DistillError


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
DISTILL_SCALES = ("fixed", "gradient")
AUGMENT_PRESETS = ("none", "light", "standard")


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
    kind = field_type(name)
    base, _, optional = kind.partition(" | ")
    what, types = _TYPES[base]
    ok = (value is None and optional == "None") or (isinstance(value, types) and not (isinstance(value, bool) and bool not in types))
    if ok and base == "list[str]" and value is not None:
        ok = all(isinstance(item, str) for item in value)
    if not ok:
        raise DistillError(f"{option_name(name)} must be {field_info(name)['kind'] or what}, got {value!r}")
    return float(value) if base == "float" and value is not None else value


def option_name(name: str) -> str:
    """How errors name a field: ``lr (--lr)``; TOML-only fields (``students``) by their key alone."""
    if not field_info(name)["cli"]:
        return name
    return f"{name} ({flag_name(name)})"


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
    _check_choices(cfg)
    _check_counts(cfg)
    _check_darkrank(cfg)
    _check_bounds(cfg)
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


def _check_choices(cfg: Config) -> None:
    """The options that name one of a few choices."""
    if cfg.darkrank not in DARKRANK_MODES:
        raise DistillError(f"--darkrank must be one of {', '.join(DARKRANK_MODES)}, got '{cfg.darkrank}'")
    if cfg.distill_scale not in DISTILL_SCALES:
        raise DistillError(f"--distill-scale must be one of {', '.join(DISTILL_SCALES)}, got '{cfg.distill_scale}'")
    if cfg.sampler not in SAMPLERS:
        raise DistillError(f"--sampler must be one of {', '.join(SAMPLERS)}, got '{cfg.sampler}'")
    if cfg.darkrank_method not in DARKRANK_METHODS:
        raise DistillError(f"--darkrank-method must be one of {', '.join(DARKRANK_METHODS)}, got '{cfg.darkrank_method}'")
    if cfg.augment is not None and cfg.augment not in AUGMENT_PRESETS:
        raise DistillError(f"--augment must be one of {', '.join(AUGMENT_PRESETS)}, got '{cfg.augment}'")


def _check_counts(cfg: Config) -> None:
    """Lengths, batch shape and the validation share in their ranges (``check_type`` has already
    refused a length that is not a whole number, e.g. ``epochs = 2.5`` in a TOML file or recipe)."""
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


def _check_darkrank(cfg: Config) -> None:
    """DarkRank's list size, ListMLE@k and samples, and the lists soft DarkRank can handle."""
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


def _check_bounds(cfg: Config) -> None:
    """The numbers with a lower bound (``above`` or ``at_least`` in their field metadata)."""
    for f in fields(cfg):
        strict = f.metadata["above"] is not None
        low = f.metadata["above"] if strict else f.metadata["at_least"]
        if low is None:
            continue
        name, value = f.name, getattr(cfg, f.name)
        if value is None:  # an optional number left unset: its default is chosen later
            continue
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise DistillError(f"{option_name(name)} must be {'>' if strict else '>='} {low:g}, got {value:g}")


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


def distill_terms(cfg: Config) -> dict[str, float]:
    """The ``--distill`` terms that are on (weight > 0), checked against the registry."""
    from distill.losses.registry import parse_spec  # losses import torch: only when the config is checked

    return {name: weight for name, weight in parse_spec(cfg.distill, "distill") if weight}


def label_free(cfg: Config) -> bool:
    """True when the distilled student learns from the unlabeled images alone (no labeled training)."""
    return cfg.unlabeled_only or cfg.data == "none"


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
