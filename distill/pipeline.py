"""``run(config)``: teacher -> per student: baseline, distilled -> evaluate -> export -> bench -> report.

Each stage is a plain function usable from Python; the CLI only parses options and calls them.
Only the main process (rank 0 under torchrun) evaluates, exports, benchmarks and writes the report.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from torch import Tensor, nn

from distill.config import Config, export_precisions, student_specs
from distill.data import Splits, load_dataset
from distill.data.dataset import ImageDataset, make_label_map, stack_labels
from distill.data.transforms import build_transform
from distill.engine import TrainSettings, barrier, extract, fit, is_main_process, resolve_device
from distill.errors import DistillError
from distill.evaluate import reid_metrics, retrieval_metrics
from distill.losses.darkrank import DarkRankLoss
from distill.losses.task import HPARAMS
from distill.modelfile import read_model_file, save_model
from distill.objective import StudentObjective
from distill.students import create_student
from distill.teachers import build_teacher_model, load_backbone_weights, load_teacher
from distill.teachers.cache import cache_key, cached_outputs, data_fingerprint

console = Console(stderr=True)


@dataclass
class Prepared:
    """The data of a run: splits, the training set (with contiguous labels) and the eval transform."""

    splits: Splits
    train: ImageDataset
    train_plain: ImageDataset
    eval_transform: Callable
    num_classes: int


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


def check_models(cfg: Config) -> None:
    """Fail fast on an unknown teacher/student name or a missing file, before any training starts."""
    for name, width in student_specs(cfg):
        create_student(name, cfg.embed_dim, 2, width=width, multiscale=cfg.multiscale)
    if cfg.teacher.startswith("onnx:"):
        if not Path(cfg.teacher[5:]).is_file():
            raise DistillError(f"ONNX teacher file not found: {cfg.teacher[5:]}")
    else:
        build_teacher_model(cfg.teacher, cfg.embed_dim, 2)
    if cfg.teacher_weights and not Path(cfg.teacher_weights).is_file():
        raise DistillError(f"teacher weights not found: {cfg.teacher_weights}")
    if cfg.teacher.startswith(("timm:", "torchvision:")) and not cfg.teacher_weights:
        raise DistillError(
            f"teacher {cfg.teacher} needs local weights (nothing is downloaded): pass --teacher-weights PATH, "
            "a .pth/.safetensors state dict of the library model (fine-tuned here first) or a distill model file"
        )


def prepare_data(cfg: Config) -> Prepared:
    """Load the data set (its loader skips unreadable images), build train (augmented and plain) datasets."""
    splits = load_dataset(cfg.data, **cfg.data_options())
    if not splits.train or not splits.query:
        raise DistillError(f"data set '{cfg.data}' has no training or no test images")
    label_map = make_label_map(splits.train)
    preload = len(splits.train) <= 20_000 and cfg.image_size[0] * cfg.image_size[1] <= 128 * 64
    kind = splits.protocol
    # The embedded default is already varied per image; it trains un-augmented so the teacher
    # outputs can be cached once for every epoch.
    augment = cfg.data.partition(":")[0] != "synthetic"
    eval_tf = build_transform(cfg.image_size, train=False, kind=kind)
    train_tf = build_transform(cfg.image_size, train=True, kind=kind) if augment else eval_tf
    train = ImageDataset(splits.train, train_tf, label_map, preload=preload)
    plain = ImageDataset(splits.train, eval_tf, label_map, preload=False) if augment else train
    if plain is not train and preload:
        plain._cache = train._cache
    return Prepared(splits, train, plain, eval_tf, len(label_map))


def train_settings(cfg: Config, device: torch.device, teacher: bool = False) -> TrainSettings:
    return TrainSettings(
        epochs=cfg.teacher_epochs if teacher else cfg.epochs,
        lr=cfg.teacher_lr if teacher else cfg.lr,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        images_per_id=cfg.images_per_id,
        sampler=cfg.sampler,
        margin=float(cfg.loss_options.get("triplet_margin", HPARAMS["triplet_margin"])),
        seed=cfg.seed,
        device=str(device),
        amp=cfg.amp,
        compile=cfg.compile,
        workers=cfg.workers,
        resume=cfg.resume,
    )


def get_teacher(cfg: Config, data: Prepared, device: torch.device):
    """A frozen teacher: from ``onnx:``/a distill model file, or trained here once and cached in the run dir."""
    if cfg.teacher.startswith("onnx:"):
        return load_teacher(cfg.teacher, device=str(device))
    if cfg.teacher_weights and is_distill_model_file(cfg.teacher_weights):
        return load_teacher(cfg.teacher, weights=cfg.teacher_weights, device=str(device))
    path = cfg.out_dir / "teacher.pt"
    fingerprint = data_fingerprint(data.splits.train)
    if path.exists():
        info, _ = read_model_file(path)
        meta = info.get("meta", {})
        if info.get("arch") == cfg.teacher and meta.get("data") == fingerprint and meta.get("image_size") == list(cfg.image_size):
            console.print(f"[green]reusing the teacher trained earlier:[/] {path}")
            return load_teacher(cfg.teacher, weights=str(path), device=str(device))
        console.print(f"[yellow]{path} was trained for another teacher, data set or image size: training a new one")
    model = build_teacher_model(cfg.teacher, cfg.embed_dim, data.num_classes)
    if cfg.teacher_weights:
        load_backbone_weights(model, cfg.teacher_weights)
    objective = StudentObjective(cfg.loss, cfg.embed_dim, data.num_classes, loss_options=cfg.loss_options)
    fit(
        model, objective, data.train, train_settings(cfg, device, teacher=True), cfg.out_dir / "teacher.ckpt",
        penalty=weight_penalty(objective), desc="teacher",
    )
    if is_main_process():
        save_model(path, model, arch=cfg.teacher, data=fingerprint, image_size=list(cfg.image_size))
    barrier()
    return load_teacher(cfg.teacher, weights=str(path), device=str(device))


def weight_penalty(objective: StudentObjective) -> Callable[[nn.Module], Tensor] | None:
    """The task loss's L2 weight penalty (``--loss-opt weight_l2=0.001``), or None when it is off."""
    return objective.task.weight_penalty if objective.task.hparams["weight_l2"] > 0 else None


def is_distill_model_file(path: str) -> bool:
    """True when ``path`` is one of our model files (else it is backbone weights to fine-tune from)."""
    try:
        read_model_file(path)
    except DistillError as err:
        if not Path(path).exists():
            raise
        if "not a distill model file" in str(err):
            return False
        raise
    return True


def teacher_outputs(cfg: Config, teacher, data: Prepared, device: torch.device) -> Callable[[Tensor, Tensor], Any]:
    """Per-batch teacher outputs: looked up in the on-disk cache when training is un-augmented,
    computed on the fly (no grad) on the augmented batch otherwise."""
    if data.train is data.train_plain:
        key = cache_key(teacher.fingerprint, data.splits.train, data.eval_transform)
        (emb, logits), hit = cached_outputs(key, cfg.out_dir / "cache", lambda: tuple(extract(teacher, data.train_plain, device)))
        if hit:
            console.print("[green]teacher outputs read from the cache")
        emb, logits = emb.to(device), (logits.to(device) if logits is not None else None)
        return lambda images, indices: (emb[indices], logits[indices] if logits is not None else None)

    @torch.no_grad()
    def online(images: Tensor, indices: Tensor):
        return teacher(images)

    return online


def train_student(cfg: Config, data: Prepared, device: torch.device, teacher=None, name: str = "student") -> nn.Module:
    """Train a student; with a teacher, the objective adds KD and DarkRank to the task losses."""
    torch.manual_seed(cfg.seed)
    model = create_student(cfg.student, cfg.embed_dim, data.num_classes, width=cfg.student_width, multiscale=cfg.multiscale)
    darkrank = None
    if teacher is not None and cfg.darkrank != "none":
        darkrank = DarkRankLoss(cfg.darkrank_alpha, cfg.darkrank_beta, mode=cfg.darkrank, list_size=cfg.darkrank_list_size, method=cfg.darkrank_method)
    objective = StudentObjective(
        cfg.loss,
        cfg.embed_dim,
        data.num_classes,
        kd_weight=cfg.kd_weight if teacher is not None else 0.0,
        kd_temperature=cfg.kd_temperature,
        darkrank=darkrank,
        darkrank_weight=cfg.darkrank_weight,
        teacher_has_logits=teacher.has_logits if teacher is not None else True,
        loss_options=cfg.loss_options,
    )
    teacher_fn = teacher_outputs(cfg, teacher, data, device) if teacher is not None else None
    fit(
        model, objective, data.train, train_settings(cfg, device), cfg.out_dir / f"{name}.ckpt",
        teacher_fn=teacher_fn, penalty=weight_penalty(objective), desc=name,
    )
    if is_main_process():
        save_model(
            cfg.out_dir / f"{name}.pt", model, arch=cfg.student, width=cfg.student_width,
            multiscale=cfg.multiscale, image_size=list(cfg.image_size),
        )
    return model


def evaluate_model(fn: Callable[[Tensor], Any], data: Prepared, device: torch.device, clustering: bool = True) -> dict[str, float]:
    """Recall@K (and, with ``clustering``, k-means NMI/F1) over all test images; mAP and rank-1 with
    the data set's protocol."""
    splits = data.splits
    q_ds = ImageDataset(splits.query, data.eval_transform)
    qf = extract(fn, q_ds, device)[0]
    q_labels, q_cams = stack_labels(splits.query)
    if splits.protocol == "reid":
        g_ds = ImageDataset(splits.gallery, data.eval_transform)
        gf = extract(fn, g_ds, device)[0]
        g_labels, g_cams = stack_labels(splits.gallery)
        reid = reid_metrics(qf, gf, q_labels, g_labels, q_cams, g_cams)
        retrieval = retrieval_metrics(torch.cat([qf, gf]), torch.cat([q_labels, g_labels]), clustering=clustering)
    else:
        # every test image queries all the others: a distinct "camera" per image removes only itself
        cams = torch.arange(len(q_labels))
        reid = reid_metrics(qf, qf, q_labels, q_labels, cams, cams)
        retrieval = retrieval_metrics(qf, q_labels, clustering=clustering)
    metrics = {k: float(v) for k, v in retrieval.items() if k.startswith("recall@") or k in ("nmi", "f1")}
    metrics.update(map=float(reid["map"]), rank1=float(reid["rank1"]))
    return metrics


def setup(cfg: Config) -> tuple[Prepared, torch.device]:
    """What every command that trains needs first: checked names, a writable out dir, the data."""
    device = resolve_device(cfg.device)
    check_models(cfg)
    prepare_out_dir(cfg)
    data = prepare_data(cfg)
    console.print(
        f"data [bold]{data.splits.name}[/]: {len(data.splits.train)} train images of {data.num_classes} identities, "
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
    dataset = ImageDataset(data.splits.train, data.eval_transform)
    picks = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).long().unique()
    return torch.stack([dataset[int(i)][0] for i in picks])


def run(cfg: Config) -> dict:
    """The whole job of ``distill run``; returns the report dict (also written to ``cfg.out_dir``).

    Every student of the config is trained without (baseline) and with distillation against the one
    teacher; every report row is scored on the test set with the artefact it names: the PyTorch
    model, or each exported ONNX file (one per precision) run in ONNX Runtime.
    """
    from distill.bench import benchmark_onnx, benchmark_torch, count_gflops, count_params, machine_info, ort_providers
    from distill.export import OnnxEmbedder, export_onnx
    from distill.report import build_report, print_report, write_report

    started = time.perf_counter()
    data, device = setup(cfg)
    out = cfg.out_dir
    teacher = get_teacher(cfg, data, device)
    trained = []
    for spec, suffix, student_cfg in student_runs(cfg):
        baseline = train_student(student_cfg, data, device, name=f"student_baseline{suffix}") if cfg.baseline else None
        student = train_student(student_cfg, data, device, teacher=teacher, name=f"student{suffix}")
        trained.append((spec, suffix, student, baseline))
    if not is_main_process():
        return {}

    providers = ort_providers()
    bench_kw = dict(image_size=cfg.image_size, iters=cfg.bench_iters)
    entries = []

    def entry(name: str, role: str, spec: str | None, fn, bench: dict, size: tuple, precision: str = "fp32", **extra) -> None:
        console.print(f"evaluating {name} ({bench['runtime']}, {precision})")
        metrics = evaluate_model(fn, data, device, cfg.clustering)
        entries.append({"name": name, "role": role, "student": spec, "precision": precision, **bench,
                        "params": size[0], "gflops": size[1], "metrics": metrics, **extra})

    def onnx_entry(name: str, role: str, spec: str | None, info: dict, size: tuple) -> None:
        embedder = OnnxEmbedder(info["path"], providers)
        entry(name, role, spec, embedder, benchmark_onnx(info["path"], providers=providers, **bench_kw), size, info["precision"],
              onnx_file=info["path"], max_abs_diff=info["max_abs_diff"])

    if teacher.module is not None:
        t_size = count_params(teacher.module), count_gflops(teacher.module, cfg.image_size)
        entry("teacher", "teacher", None, teacher, benchmark_torch(teacher.module, device=str(device), **bench_kw), t_size)
        onnx_entry("teacher", "teacher", None, export_onnx(teacher.module, out / "teacher.onnx", cfg.image_size), t_size)
    else:
        entry("teacher", "teacher", None, teacher, benchmark_onnx(cfg.teacher.partition(":")[2], **bench_kw), (None, None))

    precisions = export_precisions(cfg)
    calibration = calibration_images(data) if "int8-static" in precisions else None
    onnx_infos = []
    for spec, suffix, student, baseline in trained:
        s_size = count_params(student), count_gflops(student, cfg.image_size)
        student_torch = benchmark_torch(student, device=str(device), **bench_kw)
        if baseline is not None:  # same architecture as the student: same speed, its own accuracy
            entry(f"student_baseline{suffix}", "student_baseline", spec, baseline, student_torch, s_size)
        entry(f"student{suffix}", "student", spec, student, student_torch, s_size)
        for precision in precisions:
            path = out / (f"student{suffix}.onnx" if precision == "fp32" else f"student{suffix}.{precision}.onnx")
            console.print(f"exporting student{suffix} to ONNX ({precision})")
            info = export_onnx(student, path, cfg.image_size, precision=precision, calibration=calibration)
            onnx_infos.append(info)
            onnx_entry(f"student{suffix}", "student", spec, info, s_size)

    config = cfg.to_dict() | {"device_resolved": str(device), "wall_time_s": round(time.perf_counter() - started, 1)}
    report = build_report(entries, config, onnx_infos[0], protocol=data.splits.protocol,
                          target_accuracy=cfg.target_accuracy, machine=machine_info())
    write_report(report, out)
    print_report(report)
    return report
