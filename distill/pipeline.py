"""``run(config)``: teacher -> per student: baseline, distilled -> evaluate -> export -> bench -> report.

Each stage is a plain function usable from Python; the CLI only parses options and calls them.
Only the main process (rank 0 under torchrun) evaluates, exports, benchmarks and writes the report.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.console import Console
from rich.markup import escape
from torch import Tensor, nn
from torch.utils.data import Dataset

from distill.config import DEFAULT_EPOCHS, DEFAULT_TEACHER_EPOCHS, Config, distill_terms, export_precisions, label_free, student_specs
from distill.data import Sample, Splits, data_fingerprint, hold_out_identities, load_dataset
from distill.data.inputs import choose_augment, choose_image_size
from distill.data.importance import ImportanceBatchSampler
from distill.data.samplers import PKSampler
from distill.data.dataset import ImageDataset, make_label_map
from distill.data.unlabeled import JointDataset, UnlabeledBatchSampler, load_unlabeled, unlabeled_fingerprint
from distill.data.transforms import build_transform
from distill.engine import BatchSampler, TrainSettings, barrier, distributed, extract, fit, is_main_process, resolve_device
from distill.errors import DistillError
from distill.selection import chance_note, random_ranking_ap
from distill.evaluate import evaluate_model, reid_metrics, retrieval_metrics
from distill.losses.task import HPARAMS
from distill.models import NotAModelFile, build_model, model_cfg, parse_spec, read_model_file, save_model
from distill.models.file import load_backbone_weights
from distill.objective import StudentObjective, build_objective, distillation_fields, unusable_logits
from distill.students import create_student
from distill.students.weights import load_student_weights, student_weights_file
from distill.teachers import Teacher, file_fingerprint, load_teacher
from distill.teachers.cache import cache_key, cached_outputs
from distill.teachers.layers import EMBEDDING, PooledLayers, choose_layer, feature_layers
from distill.timing import StageClock, summary_line

console = Console(stderr=True)


@dataclass
class Prepared:
    """The data of a run: splits, the training set (with contiguous labels), the validation images
    (held-out training identities; empty when validation is off), the eval transform and the
    unlabeled images (``--unlabeled``, given by ``unlabeled_spec``). A run on unlabeled images alone
    has no training set and ``num_classes`` 0."""

    splits: Splits
    train: ImageDataset
    train_plain: ImageDataset
    val: list[Sample]
    eval_transform: Callable
    num_classes: int
    unlabeled: list[Sample] = field(default_factory=list)
    unlabeled_spec: str | None = None


def prepare_out_dir(cfg: Config) -> Path:
    out = cfg.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise DistillError(f"cannot write to output directory {out}: {err.strerror} (choose another with --out)") from None
    return out


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
    else:
        model = build_model(cfg.teacher, cfg.embed_dim, 2)
        names = dict(model.named_modules())
        if teacher.kind == "builtin" and cfg.teacher_layer not in ("auto", EMBEDDING, *(n for n in names if n)):
            raise DistillError(
                f"--teacher-layer: {cfg.teacher} has no layer '{cfg.teacher_layer}'; use auto, embedding or one of "
                f"{', '.join(model_cfg(cfg.teacher).feature_layers)} (or another module name)"
            )
    if cfg.teacher_weights and not Path(cfg.teacher_weights).is_file():
        raise DistillError(f"teacher weights not found: {cfg.teacher_weights}")
    if teacher.kind in ("timm", "torchvision") and not cfg.teacher_weights and not scratch_teacher:
        raise DistillError(
            f"teacher {cfg.teacher} needs local weights (nothing is downloaded): pass --teacher-weights PATH, "
            "a .pth/.safetensors state dict of the library model (used as it is, or fine-tuned here first with "
            f"--teacher-finetune) or a distill model file (e.g. from `distill train-teacher --teacher {cfg.teacher}`, "
            "which trains it from scratch)"
        )
    if label_free(cfg) and teacher.kind != "onnx" and (not cfg.teacher_weights or cfg.teacher_finetune):
        raise DistillError(
            "a run on unlabeled images alone learns from a finished teacher: pass --teacher-weights PATH (a distill "
            "model file or the finished model's state dict, used as it is; no --teacher-finetune)"
        )
    if cfg.teacher_finetune and not cfg.teacher_weights:
        raise DistillError("--teacher-finetune fine-tunes given weights: pass --teacher-weights PATH (a plain state dict)")


def choose_inputs(cfg: Config, splits: Splits, device: torch.device, quiet: bool = False) -> None:
    """Fill in what was left to the data (input size, augmentation preset, batch size) and print it
    (unless ``quiet``). Idempotent: what is set already stays."""
    dataset = cfg.data.partition(":")[0]
    dataset = "imagefolder" if dataset == "none" else dataset  # unlabeled images alone: images of unknown content
    chosen = []
    if cfg.image_size is None:
        cfg.image_size = choose_image_size(dataset, splits.train, gpu=device.type == "cuda")
        chosen.append(f"input {cfg.image_size[0]}x{cfg.image_size[1]}")
    if cfg.augment is None:
        cfg.augment = choose_augment(dataset)
        chosen.append(f"augmentation '{cfg.augment}'" + ("" if cfg.flip is None else f" (flip {'on' if cfg.flip else 'off'})"))
    ids = len({s.label for s in splits.train if s.label >= 0})
    if 0 < ids < cfg.batch_size // cfg.images_per_id:
        cfg.batch_size = max(2, ids) * cfg.images_per_id
        chosen.append(f"batch {cfg.batch_size} ({ids} identities x {cfg.images_per_id})")
        if cfg.darkrank_list_size is not None and cfg.darkrank_list_size >= cfg.batch_size:
            cfg.darkrank_list_size = cfg.batch_size - 1
            chosen.append(f"DarkRank lists of {cfg.darkrank_list_size}")
    if chosen and not quiet:
        console.print(f"chosen for {escape(splits.name)}: " + ", ".join(chosen) + " (set them with --image-size, --augment, --batch-size)")


def prepare_data(cfg: Config, device: torch.device = torch.device("cpu")) -> Prepared:
    """Load the data set (its loader skips unreadable images) and the unlabeled images, choose the
    inputs, hold out validation identities, build train (augmented and plain) datasets.

    A run on unlabeled images alone (``label_free``) trains on none of ``--data``'s images: its test
    split only evaluates (``--data none``: there is none)."""
    free = label_free(cfg)
    splits = Splits("none", [], [], []) if cfg.data == "none" else load_dataset(cfg.data, **cfg.data_options())
    if not free or splits.query:
        check_splits(splits, cfg.data, train=not free)
    train_samples, val = ([], []) if free else hold_out_identities(splits.train, cfg.val_fraction)
    unlabeled = load_unlabeled(cfg.unlabeled, cfg.strict, exclude=splits.query + splits.gallery) if cfg.unlabeled else []
    choose_inputs(cfg, replace(splits, train=train_samples or unlabeled), device)
    label_map = make_label_map(train_samples)
    preload = len(train_samples) <= 20_000 and cfg.image_size[0] * cfg.image_size[1] <= 128 * 64
    kind = splits.protocol
    eval_tf = build_transform(cfg.image_size, train=False, kind=kind)
    # Un-augmented training (the embedded default is already varied per image) lets the teacher's
    # outputs be cached once for every epoch.
    augment = cfg.augment != "none" or bool(cfg.flip)
    train_tf = build_transform(cfg.image_size, train=True, kind=kind, preset=cfg.augment, flip=cfg.flip) if augment else eval_tf
    train = ImageDataset(train_samples, train_tf, label_map, preload=preload)
    plain = ImageDataset(train_samples, eval_tf, label_map, preload=False) if augment else train
    if plain is not train and preload:
        plain._cache = train._cache
    return Prepared(splits, train, plain, val, eval_tf, len(label_map), unlabeled, cfg.unlabeled)


DISTRACTOR_METRIC = "map with training distractors"


def distractor_map(fn: Callable[[Tensor], Any], data: Prepared, device: torch.device, max_distractors: int = 1000) -> float:
    """mAP of every validation image searching the other validation images plus (up to
    ``max_distractors``, evenly spread) un-augmented training images as distractors.

    What the teacher gate and ``--teacher-layer auto`` compare by. With a handful of held-out
    identities, Recall@1 among them alone is close to a coin toss between two people; the training
    images ask what matters for classes the model never saw: does it keep them apart from the ones
    it was fitted to; and mAP scores the whole ranking, not only its first place.
    """
    return distractor_maps(fn, data, device, max_distractors, count=1)[0]


def distractor_maps(
    fn: Callable[[Tensor], Any], data: Prepared, device: torch.device, max_distractors: int = 1000, count: int | None = None,
    per_query: bool = False,
) -> list:
    """:func:`distractor_map` of each of the first ``count`` outputs of ``fn`` (all when None): a
    model's embedding alone (``count=1``, not its logits), or every layer of ``PooledLayers``.
    With ``per_query``, each is the list of every validation query's AP instead of their mean."""
    distractors = _distractors(data, max_distractors)
    val = extract(fn, ImageDataset(data.val, data.eval_transform), device)
    train = extract(fn, ImageDataset(distractors, data.eval_transform), device)
    labels = torch.tensor([s.label for s in data.val])
    gallery_labels = torch.cat([labels, torch.full((len(distractors),), int(labels.min()) - 1)])  # no query's label
    cams = torch.arange(len(labels))  # a distinct "camera" per image removes only the query itself
    gallery_cams = torch.cat([cams, torch.full((len(distractors),), -1)])
    results = [
        reid_metrics(v, torch.cat([v, t]), labels, gallery_labels, cams, gallery_cams, per_query=per_query)
        for v, t in list(zip(val, train))[:count]
    ]
    return [r["ap"] if per_query else float(r["map"]) for r in results]


def _distractors(data: Prepared, max_distractors: int) -> list[Sample]:
    """Up to ``max_distractors`` training images, evenly spread (so over the training identities)."""
    picks = torch.linspace(0, len(data.train_plain) - 1, min(max_distractors, len(data.train_plain))).long().unique()
    return [data.train_plain.samples[int(i)] for i in picks]


def distractor_chance(data: Prepared, max_distractors: int = 1000) -> float:
    """:func:`distractor_map` of a random ranking (its expectation): the chance level of the
    validation score, from how many images each validation identity has and the gallery size."""
    counts = Counter(s.label for s in data.val)
    relevant = torch.tensor([counts[s.label] - 1 for s in data.val])
    relevant = relevant[relevant > 0]  # queries without a match are not scored
    gallery = len(data.val) - 1 + len(_distractors(data, max_distractors))
    return float(random_ranking_ap(relevant, gallery).mean())


def layer_scores(teacher: Teacher, layers: list[str], data: Prepared, device: torch.device) -> dict[str, float]:
    """:func:`distractor_map` of the teacher's embedding and of each layer (one forward pass), listed
    embedding first, then from the deepest layer to the shallowest (the order ties are broken in)."""
    probe = PooledLayers(teacher.module, layers)
    try:
        scores = dict(zip([EMBEDDING, *layers], distractor_maps(probe, data, device)))
    finally:
        probe.close()
    return {name: scores[name] for name in [EMBEDDING, *reversed(layers)]}


def validator(data: Prepared, device: torch.device) -> Callable[[nn.Module], list[float]] | None:
    """The ``fit`` hook that scores a model on the validation identities (None when there are none):
    every query's AP by the :func:`distractor_map` protocol, the evidence ``distill.selection``
    weighs to keep an epoch."""
    return (lambda model: distractor_maps(model, data, device, count=1, per_query=True)[0]) if data.val else None


def check_splits(splits: Splits, spec: str, train: bool = True) -> None:
    """Fail before any training when the data cannot be trained or evaluated on: P x K batches and
    the triplet/verification losses need 2 training classes with 2+ images; the test protocol needs
    queries that have a match (retrieval: a test class with 2+ images, and 9+ images for Recall@8;
    re-ID: a query whose person is in the gallery from another camera). ``train=False``: the test
    split alone (a run that trains on unlabeled images)."""
    if (train and not splits.train) or not splits.query:
        raise DistillError(f"data set '{spec}' has no training or no test images")
    reid = splits.protocol == "reid"
    word, unit = ("identities", "identity") if reid else ("classes", "class")
    train_counts = Counter(s.label for s in splits.train)
    if train and sum(n >= 2 for n in train_counts.values()) < 2:
        raise DistillError(
            f"data set '{spec}': training needs at least 2 {word} with 2 or more images each, got "
            f"{len(train_counts)} {word} and {len(splits.train)} images: add images per {unit}"
        )
    if reid:
        cameras: dict[int, set[int]] = {}
        for s in splits.gallery:
            cameras.setdefault(s.label, set()).add(s.camera)
        if not any(cameras.get(q.label, set()) - {q.camera} for q in splits.query):
            raise DistillError(
                f"data set '{spec}': no query has an image of the same person from another camera in the gallery, "
                "so mAP and rank-1 cannot be measured: check the query and gallery images"
            )
    else:
        test_counts = Counter(s.label for s in splits.query)
        if not any(n >= 2 for n in test_counts.values()):
            raise DistillError(
                f"data set '{spec}': no test class has 2 or more images, so no query has a match: "
                "add test images per class"
            )
        if len(splits.query) < 9:
            raise DistillError(f"data set '{spec}': Recall@8 needs at least 9 test images, got {len(splits.query)}")


def train_settings(cfg: Config, device: torch.device, teacher: bool = False) -> TrainSettings:
    """The teacher's or the students' training settings. A length the user gave (epochs or steps)
    runs as given; only the default length is raised to the minimum number of steps."""
    epochs, steps, minimum = (
        (cfg.teacher_epochs, cfg.teacher_steps, cfg.teacher_min_steps) if teacher else (cfg.epochs, cfg.steps, cfg.min_steps)
    )
    given = epochs is not None or steps is not None
    return TrainSettings(
        epochs=epochs if epochs is not None else (DEFAULT_TEACHER_EPOCHS if teacher else DEFAULT_EPOCHS),
        steps=steps,
        min_steps=0 if given else minimum,
        lr=cfg.teacher_lr if teacher else cfg.lr,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        device=str(device),
        amp=cfg.amp,
        compile=cfg.compile,
        workers=cfg.workers,
        resume=cfg.resume,
        fresh=cfg.fresh,
        gather_embeddings=cfg.gather_embeddings,
    )


def batch_sampler(cfg: Config, labels: Sequence[int]) -> BatchSampler:
    """This process's training batches: ``cfg.sampler`` (P x K or importance sampling) over ``labels``,
    seeded by ``cfg.seed``, its share of them under torchrun."""
    rank, world = distributed()
    if cfg.sampler == "importance":
        margin = float(cfg.loss_options.get("triplet_margin", HPARAMS["triplet_margin"]))
        return ImportanceBatchSampler(labels, cfg.batch_size, margin=margin, seed=cfg.seed, rank=rank, world_size=world)
    p, k = cfg.batch_size // cfg.images_per_id, cfg.images_per_id
    sampler = PKSampler(labels, p=p, k=k, seed=cfg.seed, rank=rank, world_size=world)
    if len(sampler) == 0:
        raise DistillError(
            f"the training set is too small for batches of {p} identities x {k} images "
            f"({len(set(labels))} identities): lower --batch-size"
        )
    return sampler


# Every Config field that shapes a teacher trained here: a cached <out>/teacher.pt is reused only
# when all of them (and the training data) match. New options that shape the teacher go here.
TEACHER_FIELDS = (
    "teacher", "teacher_weights", "embed_dim", "image_size", "augment", "flip", "val_fraction", "teacher_epochs",
    "teacher_steps", "teacher_min_steps", "teacher_lr", "weight_decay", "batch_size", "images_per_id", "sampler",
    "loss", "loss_options", "seed",
)


def teacher_recipe(cfg: Config) -> dict[str, Any]:
    """The ``TEACHER_FIELDS`` of ``cfg`` as JSON values; given weights by their content hash, not their path."""
    recipe = {name: getattr(cfg, name) for name in TEACHER_FIELDS}
    if cfg.teacher_weights:
        recipe["teacher_weights"] = file_fingerprint(cfg.teacher_weights)
    return json.loads(json.dumps(recipe))


def cached_teacher_differences(path: Path, recipe: dict[str, Any], fingerprint: str) -> list[str] | None:
    """What differs between the teacher cached at ``path`` and the one asked for ([] when it can be
    reused); None when there is no usable cache (missing or unreadable: it is then trained anew)."""
    if not path.exists():
        return None
    try:
        info, _ = read_model_file(path)
    except DistillError as err:
        console.print(f"[yellow]the cached teacher is unusable ({escape(str(err))}): training a new one")
        return None
    meta = info.get("meta", {})
    cached = meta.get("recipe", {})
    diffs = [f"{k}={cached.get(k)!r} (now {v!r})" for k, v in recipe.items() if cached.get(k) != v]
    if meta.get("data") != fingerprint:
        diffs.append("the training data")
    return diffs


def get_teacher(cfg: Config, data: Prepared, device: torch.device) -> Teacher:
    """:func:`acquire_teacher` without its timings."""
    return acquire_teacher(cfg, data, device)[0]


def acquire_teacher(cfg: Config, data: Prepared, device: torch.device) -> tuple[Teacher, dict[str, float]]:
    """A frozen teacher whose logits are used only when its classes are the task's (``task_logits``).

    With ``--teacher-layer auto`` its embedding comes from the layer that scores best on validation
    (``teachers.layers``); ``teacher.layer_choice`` records the scores (None when nothing was chosen).

    ``onnx:``, a distill model file and (without ``teacher_finetune``) a plain state dict are used as
    they are; otherwise the teacher is trained here once (from scratch, or fine-tuned from the given
    backbone weights) and cached in the run dir. Given weights are always read and checked first; the
    cache is reused only when every field in ``TEACHER_FIELDS`` and the training data match.
    Also returns the seconds of its stages: ``teacher`` (training it, or reading its weights) and,
    when a layer was chosen, ``teacher layer choice``.
    """
    started = time.perf_counter()
    weights = teacher_weights(cfg, data, device)

    def load(layer: str) -> Teacher:
        return load_teacher(cfg.teacher, weights=weights, device=str(device), layer=None if layer == EMBEDDING else layer)

    layer = EMBEDDING if cfg.teacher_layer == "auto" and "compat" in distill_terms(cfg) else cfg.teacher_layer
    if layer != "auto":  # the compat loss needs the teacher's own embedding space: no layer is searched
        teacher = check_compat(cfg, task_logits(load(layer), data.num_classes), layer)
        return teacher, {"teacher": time.perf_counter() - started}
    teacher = load(EMBEDDING)
    timings = {"teacher": time.perf_counter() - started}
    layers = feature_layers(cfg.teacher, teacher.module)
    if not layers or not data.val:
        return task_logits(teacher, data.num_classes), timings
    started = time.perf_counter()
    scores = layer_scores(teacher, layers, data, device)
    chosen = choose_layer(scores)
    teacher = teacher if chosen == EMBEDDING else load(chosen)
    console.print(
        f"teacher embedding: [bold]{escape(chosen)}[/] (validation {DISTRACTOR_METRIC} {scores[chosen]:.3f}; its own "
        f"embedding {scores[EMBEDDING]:.3f}; {len(scores)} layers tried, set one with --teacher-layer)"
    )
    teacher.layer_choice = {"chosen": chosen, "metric": DISTRACTOR_METRIC, "scores": scores}
    timings["teacher layer choice"] = time.perf_counter() - started
    return task_logits(teacher, data.num_classes), timings


def check_compat(cfg: Config, teacher: Teacher, layer: str) -> Teacher:
    """Fail before any student trains when ``--distill compat`` cannot work: the student's embedding
    must live in the teacher's space, so the sizes must match."""
    if "compat" in distill_terms(cfg) and teacher.embed_dim != cfg.embed_dim:
        raise DistillError(
            f"--distill compat puts the student in the teacher's embedding space, so --embed-dim must be its size: "
            f"got --embed-dim {cfg.embed_dim}, the teacher's {layer} layer gives {teacher.embed_dim} "
            f"(set --embed-dim {teacher.embed_dim}, or leave compat out of --distill)"
        )
    return teacher


def task_logits(teacher: Teacher, num_classes: int) -> Teacher:
    """Turn off the teacher's logits when they cannot teach the task (``unusable_logits``: its classes are
    not the task's), so they are neither computed nor cached; ``build_objective`` says what that turns off.
    ``num_classes`` 0 (no labeled data): the student takes the teacher's classes, its logits stay on."""
    if teacher.has_logits and unusable_logits(teacher, num_classes):
        teacher.has_logits = False
    return teacher


def teacher_weights(cfg: Config, data: Prepared, device: torch.device) -> str | None:
    """Where the teacher's weights are: None for ``onnx:``, the given file when it is used as it is,
    else ``<out>/teacher.pt``, trained here first unless the cached one matches the recipe."""
    if parse_spec(cfg.teacher).kind == "onnx":
        return None
    if cfg.teacher_weights and is_distill_model_file(cfg.teacher_weights):
        if cfg.teacher_finetune:
            raise DistillError(
                f"{cfg.teacher_weights} is a distill model file, used as it is: --teacher-finetune fine-tunes a plain "
                "state dict; drop it"
            )
        return cfg.teacher_weights
    if cfg.teacher_weights and not cfg.teacher_finetune:
        return cfg.teacher_weights
    torch.manual_seed(cfg.seed)  # the same --seed gives the same teacher
    model = build_model(cfg.teacher, cfg.embed_dim, data.num_classes)
    if cfg.teacher_weights:
        load_backbone_weights(model, cfg.teacher_weights)
    path = cfg.out_dir / "teacher.pt"
    fingerprint = data_fingerprint(data.train.samples)
    recipe = teacher_recipe(cfg)
    diffs = cached_teacher_differences(path, recipe, fingerprint)
    if diffs == []:
        console.print(f"[green]reusing the teacher trained earlier:[/] {escape(str(path))}")
        if (note := (teacher_fit(cfg) or {}).get("chance_note")) and is_main_process():
            console.print(f"[yellow]warning:[/] {note}")
        return str(path)
    if diffs:
        console.print(f"[yellow]{escape(str(path))} was trained with other settings ({escape('; '.join(diffs))}): training a new one")
    objective = build_objective(cfg, data.num_classes)
    checkpoint = cfg.out_dir / "teacher.ckpt"
    fit(
        model, objective, data.train, batch_sampler(cfg, data.train.labels), train_settings(cfg, device, teacher=True),
        checkpoint, penalty=weight_penalty(objective), desc="teacher", validate=validator(data, device),
        recipe=recipe | {"data_fingerprint": fingerprint},
    )
    model.fit_summary |= chance_check("the teacher", model.fit_summary, data)
    if is_main_process():
        save_model(
            path, model, arch=cfg.teacher, data=fingerprint, image_size=list(cfg.image_size), recipe=recipe,
            fit=model.fit_summary,
        )
        finished_checkpoint(checkpoint, cfg)
    barrier()
    return str(path)


def chance_check(name: str, fit_summary: dict, data: Prepared) -> dict:
    """The chance level of the validation score (``distractor_chance``) and, when ``name``'s kept
    model is near it, a warning on the console and in the returned ``chance_note`` (empty dict
    without validation)."""
    if "best_score" not in fit_summary:
        return {}
    chance = distractor_chance(data)
    note = chance_note(name, fit_summary, chance)
    if note and is_main_process():
        console.print(f"[yellow]warning:[/] {note}")
    return {"metric": DISTRACTOR_METRIC, "chance": chance, "near_chance": note is not None} | ({"chance_note": note} if note else {})


def teacher_fit(cfg: Config) -> dict | None:
    """The training summary of a teacher trained here (``<out>/teacher.pt``; None for a teacher used as given)."""
    if parse_spec(cfg.teacher).kind == "onnx" or (cfg.teacher_weights and not cfg.teacher_finetune):
        return None
    try:
        return read_model_file(cfg.out_dir / "teacher.pt")[0].get("meta", {}).get("fit")
    except DistillError:  # none yet, or unreadable
        return None


# Config fields that change no trained weight, left out of a student checkpoint's recipe; the
# teacher's own fields are left out too (its fingerprint stands for them), and for a baseline, which
# has no teacher, the distillation terms' (distillation_fields).
NOT_TRAINING_FIELDS = (
    "out", "name", "resume", "fresh", "keep_checkpoints", "baseline", "students", "export_precision", "bench_iters",
    "target_accuracy", "clustering", "require_better_teacher", "gate_margin", "device", "workers", "compile",
)


def student_recipe(cfg: Config, data: Prepared, teacher: Teacher | None) -> dict[str, Any]:
    """Everything that shapes a student's training (recorded in its checkpoint; ``--resume`` refuses a
    checkpoint whose record differs): its options, the teacher's fingerprint, the training data's."""
    skip = NOT_TRAINING_FIELDS + (distillation_fields() if teacher is None else ())
    options = {k: v for k, v in cfg.to_dict().items() if k not in skip and not k.startswith("teacher")}
    return options | {"teacher_fingerprint": teacher.fingerprint if teacher else None,
                      "data_fingerprint": data_fingerprint(data.train.samples)}


def finished_checkpoint(checkpoint: Path, cfg: Config) -> None:
    """Delete a training's checkpoint once its model file is written (unless ``keep_checkpoints``):
    it is only needed to resume, and holds the optimiser's state too (a few times the model's size)."""
    if not cfg.keep_checkpoints:
        checkpoint.unlink(missing_ok=True)


def weight_penalty(objective: StudentObjective) -> Callable[[nn.Module], Tensor] | None:
    """The task loss's L2 weight penalty (``--loss-opt weight_l2=0.001``), or None when it is off."""
    return objective.task.weight_penalty if objective.task.hparams["weight_l2"] > 0 else None


def is_distill_model_file(path: str) -> bool:
    """True when ``path`` is one of our model files (else it is a plain state dict)."""
    try:
        read_model_file(path)
    except NotAModelFile:
        return False
    return True


def teacher_outputs(
    cfg: Config, teacher, train: Dataset, plain: Dataset, eval_transform: Callable, device: torch.device
) -> Callable[[Tensor, Tensor], Any]:
    """Per-batch teacher outputs: looked up in the on-disk cache when training is un-augmented
    (``train is plain``; keyed by the teacher and every image, unlabeled ones included), computed on
    the fly (no grad) on the augmented batch otherwise."""
    if train is plain:
        key = cache_key(teacher.fingerprint, plain.samples, eval_transform)
        (emb, logits), hit = cached_outputs(key, cfg.out_dir / "cache", lambda: tuple(extract(teacher, plain, device)))
        if hit:
            console.print("[green]teacher outputs read from the cache")
        emb, logits = emb.to(device), (logits.to(device) if logits is not None else None)
        return lambda images, indices: (emb[indices], logits[indices] if logits is not None else None)

    @torch.no_grad()
    def online(images: Tensor, indices: Tensor):
        return teacher(images)

    return online


def train_student(cfg: Config, data: Prepared, device: torch.device, teacher=None, name: str = "student") -> nn.Module:
    """Train a student (from ``--student-weights`` when given); with a teacher, the objective adds the
    distillation terms to the task losses, and the unlabeled images (``--unlabeled``) join every batch.
    Without labeled data the student takes the teacher's classes (for KD)."""
    torch.manual_seed(cfg.seed)
    num_classes = data.num_classes or (teacher.num_classes if teacher is not None and teacher.has_logits else 1)
    model = create_student(cfg.student, cfg.embed_dim, num_classes, width=cfg.student_width, multiscale=cfg.multiscale)
    weights = student_weights_file(cfg.student_weights, cfg.student_pretrained, cfg.student)
    if weights:
        load_student_weights(model, weights, cfg.student, cfg.student_width)
    objective = build_objective(cfg, num_classes, teacher)
    unlabeled = unlabeled_images(cfg, data) if teacher is not None else []
    dataset, plain, sampler = training_set(cfg, data, unlabeled)
    teacher_fn = teacher_outputs(cfg, teacher, dataset, plain, data.eval_transform, device) if teacher is not None else None
    origin = {"student_weights": file_fingerprint(weights)} if weights else {}
    origin |= {"unlabeled": unlabeled_fingerprint(unlabeled, sampler.batch)} if unlabeled else {}
    checkpoint = cfg.out_dir / f"{name}.ckpt"
    fit(
        model, objective, dataset, sampler, train_settings(cfg, device), checkpoint,
        teacher_fn=teacher_fn, penalty=weight_penalty(objective), desc=name, validate=validator(data, device),
        recipe=student_recipe(cfg, data, teacher) | origin,
    )
    model.fit_summary |= chance_check(name, model.fit_summary, data)
    if is_main_process():
        save_model(
            cfg.out_dir / f"{name}.pt", model, arch=cfg.student, width=cfg.student_width,
            multiscale=cfg.multiscale, image_size=list(cfg.image_size), fit=model.fit_summary, **origin,
        )
        finished_checkpoint(checkpoint, cfg)
    return model


def unlabeled_images(cfg: Config, data: Prepared) -> list[Sample]:
    """The unlabeled images of ``cfg`` (a study recipe may name others than the run's)."""
    if cfg.unlabeled == data.unlabeled_spec:
        return data.unlabeled
    if not cfg.unlabeled:
        return []
    return load_unlabeled(cfg.unlabeled, cfg.strict, exclude=data.splits.query + data.splits.gallery)


def training_set(cfg: Config, data: Prepared, unlabeled: list[Sample]) -> tuple[Dataset, Dataset, BatchSampler]:
    """``(training set, its un-augmented twin, batch sampler)``: the labeled images in P x K (or
    importance-sampled) batches, plus ``unlabeled_batch`` unlabeled images in each when there are any."""
    labeled = batch_sampler(cfg, data.train.labels) if len(data.train) else None
    if not unlabeled:
        return data.train, data.train_plain, labeled
    rank, world = distributed()
    batch = cfg.unlabeled_batch or cfg.batch_size
    joint = JointDataset(data.train, unlabeled, data.train.transform)
    plain = joint if data.train is data.train_plain else JointDataset(data.train_plain, unlabeled, data.eval_transform)
    sampler = UnlabeledBatchSampler(
        labeled, len(data.train), len(unlabeled), batch, seed=cfg.seed, rank=rank, world_size=world,
        fingerprint=unlabeled_fingerprint(unlabeled, batch),
    )
    return joint, plain, sampler


def teacher_gate(cfg: Config, teacher, baseline: nn.Module | None, data: Prepared, device: torch.device) -> dict:
    """Is the teacher clearly better than the student trained alone? Compared on the validation
    identities (never the test set) by :func:`distractor_map`; a warning, or with
    ``require_better_teacher`` an error (exit 1).

    Returns what ``report.json`` records as ``teacher_gate``: both scores, the metric, the margin and
    a ``verdict`` of ``better``, ``not better`` or ``skipped`` (no validation split or no baseline).
    """
    gate = {"metric": DISTRACTOR_METRIC, "margin": cfg.gate_margin, "teacher": None, "baseline": None, "verdict": "skipped"}
    if not data.val or baseline is None:
        console.print("[yellow]teacher gate skipped[/]: it needs a validation split (--val-fraction) and the baseline student")
        return gate
    gate["teacher"] = distractor_map(teacher, data, device)
    gate["baseline"] = distractor_map(baseline, data, device)
    better = gate["teacher"] >= gate["baseline"] + cfg.gate_margin
    gate["verdict"] = "better" if better else "not better"
    line = (
        f"teacher gate: validation {DISTRACTOR_METRIC} teacher {gate['teacher']:.3f} vs student alone {gate['baseline']:.3f} "
        f"(needs +{cfg.gate_margin:.2f})"
    )
    if better:
        console.print(f"[green]{line}: the teacher is clearly better")
        return gate
    advice = (
        "the teacher is not clearly better than the student trained alone, so distilling from it is unlikely "
        "to help: train the teacher longer (--teacher-steps, --teacher-epochs), give better weights "
        "(--teacher-weights), or check the data"
    )
    if cfg.require_better_teacher:
        raise DistillError(f"{line}; {advice} (--require-better-teacher)", exit_code=1)
    console.print(f"[yellow]warning:[/] {line}; {advice}")
    return gate


def setup(cfg: Config, scratch_teacher: bool = False) -> tuple[Prepared, torch.device]:
    """What every command that trains needs first: checked names (``check_models``), a writable out
    dir, the data."""
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
    return data, device


def student_runs(cfg: Config) -> list[tuple[str, str, Config]]:
    """``(spec, file suffix, config)`` per student: the config has that student's name and width; the
    suffix names its files (``student-nin_bn@0.5.pt``), empty with one student (``student.pt``)."""
    specs = student_specs(cfg)
    runs = []
    for name, width in specs:
        spec = f"{name}@{width:g}"
        suffix = "" if len(specs) == 1 else "-" + re.sub(r"[^\w.@-]", "_", spec)
        runs.append((spec, suffix, replace(cfg, student=name, student_width=width, students=None)))
    return runs


def calibration_images(data: Prepared, count: int = 48) -> Tensor:
    """``count`` training images spread evenly over the training set (so over its identities), through
    the eval transform: the calibration set of int8-static quantisation."""
    dataset = ImageDataset(data.splits.train or data.unlabeled, data.eval_transform)
    picks = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).long().unique()
    return torch.stack([dataset[int(i)][0] for i in picks])


def selection_report(cfg: Config, trained: list[tuple[str, str, nn.Module, nn.Module | None]]) -> dict:
    """``selection``: per model trained with validation, the epoch kept and its score, the highest and
    the last epoch's score, the chance level; ``warnings``: the sentence of each model near chance."""
    fits = {"teacher": teacher_fit(cfg)}
    for _, suffix, student, baseline in trained:
        fits |= {f"student_baseline{suffix}": baseline.fit_summary if baseline is not None else None,
                 f"student{suffix}": student.fit_summary}
    selection = {name: fit for name, fit in fits.items() if fit and "best_epoch" in fit}
    return {"selection": selection, "warnings": [fit["chance_note"] for fit in selection.values() if fit.get("chance_note")]}


def run(cfg: Config) -> dict:
    """The whole job of ``distill run``; returns the report dict (also written to ``cfg.out_dir``).

    Every student of the config is trained without (baseline) and with distillation against the one
    teacher; every report row is scored on the test set with the artefact it names: the PyTorch
    model, or each exported ONNX file (one per precision) run in ONNX Runtime.
    """
    from distill.bench import benchmark_onnx, benchmark_torch, count_gflops, count_params, machine_info, ort_providers
    from distill.export import OnnxEmbedder, export_onnx
    from distill.report import build_report, print_report, report_row, write_report

    started = time.perf_counter()
    clock = StageClock()
    with clock.stage("data"):
        data, device = setup(cfg)
    out = cfg.out_dir
    teacher, teacher_timings = acquire_teacher(cfg, data, device)
    for name, seconds in teacher_timings.items():
        clock.add(name, seconds)
    trained, gate = [], None
    with_baseline = cfg.baseline and data.num_classes > 0
    if cfg.baseline and not with_baseline:
        console.print("no labeled training images: no baseline student (it would learn from nothing)")
    for spec, suffix, student_cfg in student_runs(cfg):
        baseline = None
        if with_baseline:
            with clock.stage(f"student_baseline{suffix}"):
                baseline = train_student(student_cfg, data, device, name=f"student_baseline{suffix}")
        if not trained and is_main_process():  # the gate compares the teacher with the first student alone
            with clock.stage("teacher gate"):
                gate = teacher_gate(cfg, teacher, baseline, data, device)
        with clock.stage(f"student{suffix}"):
            student = train_student(student_cfg, data, device, teacher=teacher, name=f"student{suffix}")
        trained.append((spec, suffix, student, baseline))
    if not is_main_process():
        return {}

    providers = ort_providers()
    bench_kw = dict(image_size=cfg.image_size, iters=cfg.bench_iters)
    entries = []

    tested = bool(data.splits.query)
    if not tested:
        console.print("[yellow]no test set[/] (--data none): the report has speed and size, no accuracy")

    def timed(what: str, name: str, runtime: str, precision: str = "fp32"):
        return clock.stage(f"{what} {name} ({runtime} {precision})")

    def entry(name: str, role: str, spec: str | None, fn, bench: dict, size: tuple, onnx: dict | None = None,
              file: Path | None = None) -> None:
        precision = onnx["precision"] if onnx else "fp32"
        console.print(f"{'evaluating' if tested else 'benchmarking'} {escape(name)} ({bench['runtime']}, {precision})")
        with timed("evaluate", name, bench["runtime"], precision):
            metrics = evaluate_model(fn, data.splits, data.eval_transform, device, cfg.clustering) if tested else {}
        entries.append(report_row(name, role, spec, bench, size, metrics, onnx, file=file))

    def onnx_entry(name: str, role: str, spec: str | None, info: dict, size: tuple) -> None:
        embedder = OnnxEmbedder(info["path"], providers)
        with timed("benchmark", name, "onnxruntime", info["precision"]):
            bench = benchmark_onnx(info["path"], providers=providers, **bench_kw)
        entry(name, role, spec, embedder, bench, size, info)

    if teacher.module is not None:
        t_size = count_params(teacher.module), count_gflops(teacher.module, cfg.image_size)
        with timed("benchmark", "teacher", "torch"):
            bench = benchmark_torch(teacher.module, device=str(device), **bench_kw)
        entry("teacher", "teacher", None, teacher, bench, t_size)
        with timed("export", "teacher", "onnx"):
            info = export_onnx(teacher.module, out / "teacher.onnx", cfg.image_size)
        onnx_entry("teacher", "teacher", None, info, t_size)
    else:
        with timed("benchmark", "teacher", "onnxruntime"):
            bench = benchmark_onnx(parse_spec(cfg.teacher).name, **bench_kw)
        entry("teacher", "teacher", None, teacher, bench, (None, None))

    precisions = export_precisions(cfg)
    calibration = calibration_images(data) if "int8-static" in precisions else None
    onnx_infos = []
    for spec, suffix, student, baseline in trained:
        s_size = count_params(student), count_gflops(student, cfg.image_size)
        with timed("benchmark", f"student{suffix}", "torch"):
            student_torch = benchmark_torch(student, device=str(device), **bench_kw)
        # the baseline is exported and scored like the student; same architecture: same speed, its own accuracy
        models = [(f"student_baseline{suffix}", "student_baseline", baseline), (f"student{suffix}", "student", student)]
        models = [(name, role, model) for name, role, model in models if model is not None]
        for name, role, model in models:
            entry(name, role, spec, model, student_torch, s_size, file=out / f"{name}.pt")
        for precision in precisions:
            onnx_bench = None
            for name, role, model in models:
                path = out / (f"{name}.onnx" if precision == "fp32" else f"{name}.{precision}.onnx")
                console.print(f"exporting {escape(name)} to ONNX ({precision})")
                with timed("export", name, "onnx", precision):
                    info = export_onnx(model, path, cfg.image_size, precision=precision, calibration=calibration)
                if role == "student":
                    onnx_infos.append(info)
                if onnx_bench is None:  # one graph for baseline and student: benchmarked once
                    with timed("benchmark", f"student{suffix}", "onnxruntime", precision):
                        onnx_bench = benchmark_onnx(info["path"], providers=providers, **bench_kw)
                entry(name, role, spec, OnnxEmbedder(info["path"], providers), onnx_bench, s_size, info)

    with clock.stage("report"):
        config = cfg.to_dict() | {"device_resolved": str(device), "wall_time_s": round(time.perf_counter() - started, 1)}
        report = build_report(entries, config, onnx_infos[0], protocol=data.splits.protocol,
                              target_accuracy=cfg.target_accuracy, machine=machine_info()) | {"teacher_gate": gate, "teacher_layer": teacher.layer_choice}
        report |= selection_report(cfg, trained)
        report["test_set"] = data.splits.name if tested else None  # None: no test set, no accuracy measured
        print_report(report)
    report["timings"] = clock.timings()  # written with the report: what is left is writing the files
    write_report(report, out)
    console.print(summary_line(clock.timings()), highlight=False)
    return report
