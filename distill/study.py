"""``distill study``: recipes x seeds on one teacher (or one per seed) -> mean, std and the paired gain over the baseline.

A *recipe* is a name plus ``Config`` overrides (loss weights, DarkRank mode...). Every recipe is
trained once per seed; the ``baseline`` recipe (the student trained alone, as ``distill run``
trains it) is always included and is the paired reference: with the same seed, baseline and recipe
start from the same student initialisation (``train_student`` seeds before building the model) and
see the same batches (the P x K sampler depends only on ``(seed, epoch)``).

Each (recipe, seed) result is written atomically to ``<out>/study/results/<recipe>/seed-<s>.json``
as soon as it is finished; a rerun skips the results whose config, teacher, data and code (a hash of
this package's sources: an upgrade or an edit must not mix two versions' numbers) still match.
A training's model file (``<out>/study/models/<recipe>-seed<s>.pt``) is deleted once it is scored,
unless ``keep_models``; its checkpoint once the model file is written, unless ``keep_checkpoints``.
Every training runs on one thread (in-process or in a worker process), so the numbers do not depend
on ``jobs`` and the same study run twice gives the same numbers on the CPU.

The statistics (mean ± std, the paired gain with its 95% confidence interval) are
``distill.study_stats``; the files and the console table ``distill.study_output``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any, Sequence

import torch

from distill.atomic import atomic_write_text
from distill.config import Config, fields_where
from distill.config_load import load_config, read_toml
from distill.console import make_console
from distill.data import data_fingerprint
from distill.data.prepare import Prepared, choose_inputs
from distill.errors import DistillError
from distill.report.text import retry_note
from distill.run import setup
from distill.students import train
from distill.study_output import write_study
from distill.study_stats import BASELINE, mean_std, stalled_seeds, summarize
from distill.study_workers import WORKER, gather, unless_stopped, worker_init
from distill.teachers.acquire import AcquiredTeacher, acquire_teacher, teacher_weights

# The lead adds more (rkd, pkt, compat): a plain dict of name -> Config overrides on the base config.
RECIPES: dict[str, dict[str, Any]] = {
    BASELINE: {"distill": "none"},  # trained without a teacher
    "kd": {"distill": "kd=3"},
    "darkrank-hard": {"distill": "darkrank=0.02", "darkrank": "hard"},
    "darkrank-soft": {"distill": "darkrank=0.1", "darkrank": "soft", "darkrank_list_size": 8},  # exact over 8!
    "kd+darkrank": {},  # the base config as given: distill run's defaults
    # the default's pull measured on the embedded set (kd 1.5x, darkrank 1.25x the task's gradient), on any data
    "kd+darkrank-gradient": {"distill": "kd=1.5,darkrank=1.25", "distill_scale": "gradient"},
    "kd+darkrank-unmixed": {"mix_rows": 0},  # the default without its mixed images: what they add on your data
}
DEFAULT_RECIPES = (BASELINE, "kd+darkrank")
# Options every recipe shares: one teacher, one data set, one device; the study sets seed and out.
SHARED_KEYS = fields_where("shared")
# Config keys that change no trained number: ignored when deciding whether a stored result is reusable.
NOT_RESULT_KEYS = fields_where("result", False)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

console = make_console(stderr=True)


# ---------------------------------------------------------------- recipes


def load_recipes_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """``[[recipe]] name = "..." <Config keys>`` tables of a TOML file -> ``{name: overrides}``.

    The values are checked against ``Config`` by ``recipe_configs``; here only the file's shape.
    """
    path = Path(path)
    data = read_toml(path, "recipes file")
    extra = sorted(set(data) - {"recipe"})
    tables = data.get("recipe")
    if extra or not isinstance(tables, list) or not tables:
        raise DistillError(
            f"recipes file {path}: expected only [[recipe]] tables (name = \"...\" plus Config keys)"
            + (f", found top-level key(s) {', '.join(extra)}" if extra else "")
        )
    recipes: dict[str, dict[str, Any]] = {}
    for i, table in enumerate(tables, 1):
        if not isinstance(table, dict):
            raise DistillError(f"recipes file {path}: recipe #{i} must be a [[recipe]] table (name = \"...\" plus Config keys), got {table!r}")
        name = table.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise DistillError(
                f"recipes file {path}: recipe #{i} needs name = \"...\" (letters, digits, . _ + -), got {name!r}"
            )
        if name in RECIPES:
            raise DistillError(f"recipes file {path}: recipe '{name}' is a built-in recipe; give yours another name")
        if name in recipes:
            raise DistillError(f"recipes file {path}: recipe '{name}' is defined twice")
        recipes[name] = {k: v for k, v in table.items() if k != "name"}
    return recipes


def recipe_config(base: Config, name: str, overrides: dict[str, Any]) -> Config:
    """The base config with the recipe's overrides, validated like a run's config (``load_config``)."""
    shared = sorted(set(overrides) & set(SHARED_KEYS))
    if shared:
        raise DistillError(
            f"recipe '{name}' sets {', '.join(shared)}: a study shares one teacher, data set, device and output "
            "directory across recipes and chooses the seeds; give these as options of `distill study` instead"
        )
    try:
        return load_config(None, **(base.to_dict() | overrides))
    except DistillError as err:
        raise DistillError(f"recipe '{name}': {err}") from None


def recipe_configs(
    base: Config, names: Sequence[str] | None = None, file_recipes: dict[str, dict[str, Any]] | None = None
) -> dict[str, tuple[dict[str, Any], Config]]:
    """``{name: (overrides, config)}`` for the chosen recipes, ``baseline`` first and always there.

    ``names`` picks from the built-ins and ``file_recipes``; without names: every file recipe, or
    (no file) ``kd+darkrank``, the distillation ``distill run`` does.
    """
    file_recipes = file_recipes or {}
    known = RECIPES | file_recipes
    if names is None:
        names = list(file_recipes) or list(DEFAULT_RECIPES)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DistillError(
            f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(known)} "
            "(built in, or define it in a --recipes-file as [[recipe]] name = \"...\")"
        )
    chosen = dict.fromkeys([BASELINE, *names])
    return {n: (known[n], recipe_config(base, n, known[n])) for n in chosen}


# ---------------------------------------------------------------- training


@dataclass
class _Context:
    """What every training of a study shares: the data, the device and the frozen teacher."""

    data: Prepared
    device: torch.device
    teacher: Any


def _train_and_evaluate(
    ctx: _Context, cfg: Config, recipe: str, keep_model: bool = False,
) -> tuple[dict[str, float], dict[str, float], str | None]:
    """One student for ``(recipe, cfg.seed)``, its test-set metrics, the seconds it took
    (``{"train_s", "evaluate_s"}``) and the warning when it was trained again at a lower learning
    rate or the kept model is near chance or no better than untrained (else None). The baseline has
    no teacher, exactly as ``distill run`` trains it. Its model file is deleted once scored unless
    ``keep_model``."""
    started = time.perf_counter()
    teacher = None if recipe == BASELINE else ctx.teacher
    name = f"study/models/{recipe}-seed{cfg.seed}"
    model, fit = train.train_student(cfg, ctx.data, ctx.device, teacher=teacher, name=name)
    trained = time.perf_counter()
    metrics = ctx.data.protocol.test_metrics(model, ctx.data.splits, ctx.data.eval_transform, ctx.device, cfg.clustering)
    if not keep_model:
        (cfg.out_dir / f"{name}.pt").unlink(missing_ok=True)
    timings = {"train_s": round(trained - started, 3), "evaluate_s": round(time.perf_counter() - trained, 3)}
    notes = [f"{name} {retry}" if (retry := retry_note(fit)) else None, fit.get("chance_note")]
    return metrics, timings, "; ".join(n for n in notes if n) or None


def _worker_data(base: Config) -> tuple[Config, Prepared, torch.device]:
    """In a worker process: the study's data, set up once."""
    if "data" not in WORKER:
        WORKER["data"] = setup(base)
    return WORKER["data"]


def _worker_train(teacher_base: Config, cfg: Config, recipe: str, keep_model: bool) -> tuple[dict[str, float], dict[str, float], str | None]:
    """In a worker process: read the teacher of ``teacher_base`` (the file the parent wrote, at the
    layer the parent chose; kept while the next training shares it), train."""
    _, data, device = _worker_data(teacher_base)
    if recipe != BASELINE and WORKER.get("teacher_out") != teacher_base.out:
        WORKER["teacher"] = acquire_teacher(teacher_base, data, device).teacher
        WORKER["teacher_out"] = teacher_base.out
    return _train_and_evaluate(_Context(data, device, WORKER.get("teacher")), cfg, recipe, keep_model)


def _worker_teacher(teacher_base: Config) -> tuple[()]:
    """In a worker process: train (or find) the teacher of ``teacher_base`` into its folder (its layer
    is chosen once, by the parent, when it reads the file)."""
    _, data, device = _worker_data(teacher_base)
    teacher_weights(teacher_base, data, device)
    return ()


def at_chosen_layer(teacher_base: Config, acquired: AcquiredTeacher) -> Config:
    """The teacher's config with the layer ``--teacher-layer auto`` chose in the parent, so that a
    worker reading the teacher does not search its layers again (a minute per teacher at 128x64)."""
    if acquired.layer_choice is None:
        return teacher_base
    return replace(teacher_base, teacher_layer=acquired.layer_choice["chosen"])


def teacher_configs(base: Config, seed_list: list[int], per_seed: bool) -> dict[int, Config]:
    """The config each seed's teacher is acquired with: the study's one teacher (``base``, in its
    output folder), or with ``per_seed`` one teacher per seed, trained with that seed in
    ``<out>/teachers/seed<s>/``."""
    if not per_seed:
        return {seed: base for seed in seed_list}
    if base.teacher_weights:
        raise DistillError("--teacher-per-seed trains one teacher per seed; --teacher-weights gives a finished one: "
                           "use one or the other")
    return {seed: replace(base, seed=seed, out=str(base.out_dir / "teachers" / f"seed{seed}")) for seed in seed_list}


def result_path(out: Path, recipe: str, seed: int) -> Path:
    return out / "study" / "results" / recipe / f"seed-{seed}.json"


@functools.cache
def code_fingerprint() -> str:
    """sha256 (16 hex digits) of the ``distill`` package's Python sources, paths included."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _identity(cfg: Config, teacher: str | None, data: str, device: torch.device) -> dict[str, Any]:
    """What a stored result must match to be reused: the config (less output-only keys), the teacher
    (None for the baseline, which has none), the data, the device ``--device auto`` resolved to and
    the code."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in NOT_RESULT_KEYS}
    identity = {"config": config, "teacher": teacher, "data": data, "device": str(device), "code": code_fingerprint()}
    return json.loads(json.dumps(identity))


def _read_result(path: Path) -> dict[str, Any] | None:
    """The stored result at ``path`` when it exists and is readable (``None`` otherwise)."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or not isinstance(stored.get("identity"), dict) or not isinstance(stored.get("metrics"), dict):
        return None
    return stored


def _without_code(identity: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in identity.items() if k != "code"}


def run_study(
    base: Config, recipes: dict[str, tuple[dict[str, Any], Config]], seeds: int = 5, jobs: int = 1,
    keep_models: bool = False, teacher_per_seed: bool = False,
) -> dict[str, Any]:
    """Train and evaluate every recipe x seed (seeds ``base.seed .. base.seed + seeds - 1``) on one
    teacher, or with ``teacher_per_seed`` on a teacher trained with each seed (so that the interval
    includes the teacher's own training noise); reuse stored results that match; write
    ``study.json``, ``study.md`` and ``study.png`` into ``base.out_dir`` and return the study dict.
    Per-seed model files stay only with ``keep_models``."""
    if seeds < 1:
        raise DistillError(f"--seeds must be >= 1, got {seeds}")
    if jobs < 1:
        raise DistillError(f"--jobs must be >= 1, got {jobs}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every training on one thread: numbers independent of --jobs, reproducible
    try:
        return _run(base, recipes, seeds, jobs, keep_models, teacher_per_seed)
    finally:
        torch.set_num_threads(threads)


def _stored_and_todo(
    base: Config, recipes: dict[str, tuple[dict[str, Any], Config]], seed_list: list[int], data: Prepared,
    device: torch.device, teacher_fingerprints: dict[int, str],
) -> tuple[dict[tuple[str, int], dict[str, Any]], list[tuple[str, Config, dict[str, Any]]]]:
    """The stored results still valid (by ``(recipe, seed)``) and the ``(recipe, config, identity)``
    trainings left to do. Each recipe's config gets the inputs chosen from the data for it
    (``choose_inputs``: a recipe may set its own batch or list size)."""
    data_fp = data_fingerprint([*data.splits.train, *data.splits.query, *data.splits.gallery])
    results: dict[tuple[str, int], dict[str, Any]] = {}
    todo: list[tuple[str, Config, dict[str, Any]]] = []
    other_code = 0
    for seed in seed_list:  # seed-major: an interrupted study keeps whole pairs
        for name, (_, rcfg) in recipes.items():
            # a training killed with the study is continued with --resume, else started over (its
            # checkpoint kept until passed): the stored results are what a study resumes from
            cfg = replace(rcfg, seed=seed, resume=base.resume, fresh=not base.resume)
            cfg = choose_inputs(cfg, replace(data.splits, train=data.train.samples), device).fill(cfg)
            identity = _identity(cfg, None if name == BASELINE else teacher_fingerprints[seed], data_fp, device)
            stored = _read_result(result_path(base.out_dir, name, seed))
            if stored is not None and stored["identity"] == identity:
                results[name, seed] = stored
                continue
            if stored is not None and _without_code(stored["identity"]) == _without_code(identity):
                other_code += 1
            todo.append((name, cfg, identity))
    if other_code:
        console.print(f"study: {other_code} stored result(s) were made by other code of distill (upgraded or edited since): "
                      "training them again, so that no table mixes two versions")
    return results, todo


def _run(base: Config, recipes: dict[str, tuple[dict[str, Any], Config]], seeds: int, jobs: int, keep_models: bool,
         teacher_per_seed: bool) -> dict[str, Any]:
    started = time.perf_counter()
    base, data, device = setup(base)
    out = base.out_dir
    seed_list = list(range(base.seed, base.seed + seeds))
    teacher_bases = teacher_configs(base, seed_list, teacher_per_seed)
    spawn = get_context("spawn")
    stop = spawn.Event()
    pool = ProcessPoolExecutor(jobs, mp_context=spawn, initializer=worker_init, initargs=(stop, os.getpid())) if jobs > 1 else None
    try:
        acquired = _teachers(teacher_bases, data, device, pool, stop)
        teachers = {seed: acquired[teacher_bases[seed].out].teacher for seed in seed_list}
        worker_teachers = {seed: at_chosen_layer(teacher_bases[seed], acquired[teacher_bases[seed].out]) for seed in seed_list}
        results, todo = _stored_and_todo(base, recipes, seed_list, data, device,
                                         {seed: t.fingerprint for seed, t in teachers.items()})
        total = len(recipes) * len(seed_list)
        console.print(f"study: {total - len(todo)} of {total} results stored already, {len(todo)} to train ({jobs} job(s))")

        def store(name: str, cfg: Config, identity: dict[str, Any], metrics: dict[str, float], timings: dict[str, float],
                  warning: str | None) -> None:
            result = {
                "recipe": name, "seed": cfg.seed, "overrides": recipes[name][0], "metrics": metrics,
                "wall_time_s": round(sum(timings.values()), 1), "timings": timings, "identity": identity, "warning": warning,
            }
            atomic_write_text(result_path(out, name, cfg.seed), json.dumps(result, indent=2) + "\n")
            results[name, cfg.seed] = result
            console.print(f"study: {name} seed {cfg.seed}: R@1 {metrics.get('recall@1', float('nan')):.4f} mAP {metrics.get('map', float('nan')):.4f}")

        if pool is None or len(todo) <= 1:
            for name, cfg, identity in todo:
                store(name, cfg, identity, *_train_and_evaluate(_Context(data, device, teachers[cfg.seed]), cfg, name, keep_models))
        else:
            futures = {pool.submit(unless_stopped, _worker_train, worker_teachers[cfg.seed], cfg, name, keep_models): (name, cfg, identity)
                       for name, cfg, identity in todo}
            gather(futures, store, stop)
    finally:
        if pool is not None:
            pool.shutdown()

    ordered = [results[name, seed] for name in recipes for seed in seed_list]
    study = {
        "recipes": {name: overrides for name, (overrides, _) in recipes.items()},
        "seeds": seed_list,
        "ci": "95% paired t: mean(d) +- t.ppf(0.975, n-1) * sd(d) / sqrt(n), d = recipe - baseline on the same seed",
        "teacher": _teacher_summary(base, teacher_bases, acquired, data, device, teacher_per_seed),
        "summary": summarize(ordered),
        "results": [{k: r[k] for k in ("recipe", "seed", "metrics")} for r in ordered],
        "timings": [{"recipe": r["recipe"], "seed": r["seed"]} | (r.get("timings") or {}) for r in ordered],
        "warnings": [f"{r['recipe']} seed {r['seed']}: {r['warning']}" for r in ordered if r.get("warning")]
        + stalled_seeds(ordered),
        "config": base.to_dict(),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    write_study(study, out)
    return study


def _teachers(teacher_bases: dict[int, Config], data: Prepared, device: torch.device,
              pool: ProcessPoolExecutor | None, stop: EventType) -> dict[str, AcquiredTeacher]:
    """Each distinct teacher of the study by its output folder, acquired here; several teachers to
    train with a pool are trained in its workers first (one per job), then read here."""
    distinct = {cfg.out: cfg for cfg in teacher_bases.values()}
    for cfg in distinct.values():
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
    if pool is not None and len(distinct) > 1:
        gather({pool.submit(unless_stopped, _worker_teacher, cfg): () for cfg in distinct.values()}, lambda: None, stop)
    return {out: acquire_teacher(cfg, data, device) for out, cfg in distinct.items()}


def _teacher_summary(base: Config, teacher_bases: dict[int, Config], acquired: dict[str, AcquiredTeacher],
                     data: Prepared, device: torch.device, per_seed: bool) -> dict[str, Any]:
    """``study.json``'s teacher: its test metrics (with ``per_seed``, the mean and ``std`` over the
    seeds' teachers, each listed in ``teachers``), fingerprint(s) and stage timings."""
    rows = []
    for seed, cfg in teacher_bases.items() if per_seed else [(base.seed, base)]:
        got = acquired[cfg.out]
        rows.append({"seed": seed, "fingerprint": got.teacher.fingerprint,
                     "metrics": data.protocol.test_metrics(got.teacher, data.splits, data.eval_transform, device, base.clustering),
                     "timings": {name: round(seconds, 3) for name, seconds in got.timings.items()}})
    names = [m for m in rows[0]["metrics"] if all(r["metrics"].get(m) is not None for r in rows)]
    stats = {m: mean_std([r["metrics"][m] for r in rows]) for m in names}
    summary = {"spec": base.teacher, "per_seed": per_seed, "fingerprint": ", ".join(r["fingerprint"] for r in rows),
               "metrics": {m: mean for m, (mean, _) in stats.items()}, "timings": rows[0]["timings"]}
    if per_seed:
        summary |= {"std": {m: std for m, (_, std) in stats.items()}, "teachers": rows}
    return summary

