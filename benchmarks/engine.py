"""Training speed: the engine's overhead over a bare PyTorch loop, and the images/s of a training
step of the teacher and the student at the embedded and at CUHK03-sized inputs.

    python benchmarks/engine.py --out benchmarks/results/engine.json

1. Overhead: ``distill.engine.fit`` (validation off; its checkpoints and log every ``ceil(epochs /
   20)`` epochs and after the last, and progress, as in a run) against a bare loop (forward, loss,
   backward, AdamW and one-cycle step) over the same batches (same sampler, seed and data loader),
   the same initial model and the same loss, on the embedded data set. The two alternate, in turn
   first, for ``--repeats`` rounds in one process; each side's median images/s is kept and
   ``overhead = bare / fit - 1``.
2. Throughput: one training step (forward, loss, backward, optimiser step) on a random P x K batch,
   per model and input size, in fp32 and in the variants that might be faster on a CPU
   (channels_last memory format, bf16 autocast, both), interleaved the same way; ``speedup`` is each
   variant's images/s over fp32's, measured side by side.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from distill.atomic import atomic_write_text
from distill.bench import machine_info
from distill.config import Config
from distill.data.samplers import loader_settings
from distill.engine import TrainSettings, fit, seed_everything
from distill.models import build_model
from distill.objective import build_objective
from distill.run import setup
from distill.students import create_student
from distill.training import batch_sampler, train_settings

VARIANTS = ("fp32", "channels_last", "bf16", "channels_last+bf16")


def bare_loop(model, objective, data, cfg: Config, settings: TrainSettings) -> float:
    """Seconds of a plain training loop over the batches ``fit`` would draw (same sampler and seed)."""
    seed_everything(settings.seed)
    sampler = batch_sampler(cfg, data.train.labels)
    loader = DataLoader(data.train, batch_sampler=sampler, **loader_settings("cpu", settings.workers))
    epochs = settings.num_epochs(len(sampler))
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=epochs * len(sampler), pct_start=0.15)
    memory_format = settings.memory_format  # as fit does
    model.to(memory_format=memory_format)
    model.train()
    objective.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for images, labels, _ in loader:
            emb, logits = model(images.contiguous(memory_format=memory_format))
            loss, _ = objective(emb, logits, labels, None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return time.perf_counter() - start


def engine_overhead(args: argparse.Namespace, console: Console) -> dict:
    cfg = Config(data="synthetic", student=args.model, student_width=args.width, out=tempfile.mkdtemp(prefix="engine-bench-"), val_fraction=0.2)
    cfg, data, _ = setup(cfg)
    settings = replace(train_settings(cfg, torch.device("cpu")), epochs=args.epochs, min_steps=0, amp=False)
    torch.manual_seed(0)
    model0 = create_student(args.model, cfg.embed_dim, data.num_classes, width=cfg.student_width)
    objective0 = build_objective(cfg, data.num_classes)
    per_epoch = len(batch_sampler(cfg, data.train.labels))
    steps = settings.num_epochs(per_epoch) * per_epoch
    images = steps * cfg.batch_size
    runs: dict[str, list[float]] = {"bare": [], "fit": []}
    for r in range(args.repeats):
        for side in ("bare", "fit") if r % 2 == 0 else ("fit", "bare"):
            model, objective = copy.deepcopy(model0), copy.deepcopy(objective0)
            if side == "bare":
                seconds = bare_loop(model, objective, data, cfg, settings)
            else:
                sampler = batch_sampler(cfg, data.train.labels)
                start = time.perf_counter()
                fit(model, objective, data.train, sampler, settings, cfg.out_dir / "bench.ckpt", desc="fit")
                seconds = time.perf_counter() - start
            runs[side].append(images / seconds)
            console.log(f"round {r + 1} {side}: {images / seconds:.0f} images/s")
    bare, fitted = statistics.median(runs["bare"]), statistics.median(runs["fit"])
    return {"model": f"{args.model}@{cfg.student_width:g}", "image_size": list(cfg.image_size), "batch_size": cfg.batch_size,
            "steps": steps, "images_per_s": runs, "bare_median": bare, "fit_median": fitted, "overhead": bare / fitted - 1}


def _step(model, objective, optimizer, images, labels, variant: str) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.endswith("bf16")):
        emb, logits = model(images)
    loss, _ = objective(emb.float(), logits.float(), labels, None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def training_throughput(args: argparse.Namespace, console: Console) -> list[dict]:
    """images/s of a training step per (model, size, variant), variants interleaved per round."""
    results = []
    p, k = args.batch // 4, 4
    labels = torch.arange(p).repeat_interleave(k)
    for spec in args.models:
        for size in args.sizes:
            h, w = size
            gen = torch.Generator().manual_seed(0)
            images = torch.randn(p * k, 3, h, w, generator=gen)
            setups = {}
            for variant in VARIANTS:
                torch.manual_seed(0)
                model = build_model(spec, 128, p) if spec == "inception_bn" else create_student(spec, 128, p, width=0.5)
                objective = build_objective(Config(), p)
                x = images
                if variant.startswith("channels_last"):
                    model = model.to(memory_format=torch.channels_last)
                    x = images.contiguous(memory_format=torch.channels_last)
                params = list(model.parameters()) + list(objective.parameters())
                optimizer = torch.optim.AdamW(params, lr=1e-4)
                model.train()
                _step(model, objective, optimizer, x, labels, variant)  # warm-up
                setups[variant] = (model, objective, optimizer, x)
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for r in range(args.repeats):
                order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
                for variant in order:
                    model, objective, optimizer, x = setups[variant]
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        _step(model, objective, optimizer, x, labels, variant)
                    times[variant].append(args.steps * len(labels) / (time.perf_counter() - start))
            row = {"model": spec, "image_size": [h, w], "batch_size": len(labels),
                   "images_per_s": {v: statistics.median(times[v]) for v in VARIANTS}}
            row["speedup"] = {v: row["images_per_s"][v] / row["images_per_s"]["fp32"] for v in VARIANTS}
            console.log(f"{spec} {h}x{w}: " + ", ".join(f"{v} {row['images_per_s'][v]:.1f} img/s" for v in VARIANTS))
            results.append(row)
    return results


def render(overhead: dict | None, throughput: list[dict], console: Console) -> None:
    if overhead:
        table = Table(title=f"fit vs bare loop, {overhead['model']} {overhead['image_size'][0]}x{overhead['image_size'][1]}, "
                            f"{overhead['steps']} steps of {overhead['batch_size']}")
        for col in ("bare loop img/s", "fit img/s", "overhead"):
            table.add_column(col, justify="right")
        table.add_row(f"{overhead['bare_median']:.0f}", f"{overhead['fit_median']:.0f}", f"{overhead['overhead']:+.1%}")
        console.print(table)
    if throughput:
        table = Table(title="training images/s (forward + loss + backward + AdamW step)")
        for col in ("model", "input", "batch", *VARIANTS):
            table.add_column(col, justify="right")
        for row in throughput:
            cells = [f"{row['images_per_s'][v]:.1f}" + ("" if v == "fp32" else f" ({row['speedup'][v]:.2f}x)") for v in VARIANTS]
            table.add_row(row["model"], f"{row['image_size'][0]}x{row['image_size'][1]}", str(row["batch_size"]), *cells)
        console.print(table)


def _size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine.json"))
    parser.add_argument("--model", default="nin_bn", help="model trained in the overhead comparison")
    parser.add_argument("--width", type=float, default=Config.student_width,
                        help="its width (default: the students'; the teacher: --model inception_bn --width 1)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per side and round in the overhead comparison")
    parser.add_argument("--repeats", type=int, default=4, help="rounds per comparison (sides alternate first)")
    parser.add_argument("--models", nargs="+", default=["inception_bn", "nin_bn"], help="models of the throughput table")
    parser.add_argument("--sizes", nargs="+", type=_size, default=[(64, 32), (128, 64), (256, 128)], help="HxW inputs")
    parser.add_argument("--batch", type=int, default=64, help="throughput batch (P x 4)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip", choices=("overhead", "throughput"), default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    overhead = engine_overhead(args, console) if args.skip != "overhead" else None
    throughput = training_throughput(args, console) if args.skip != "throughput" else []
    render(overhead, throughput, console)
    payload = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "machine": machine_info() | {"platform": platform.platform(), "cpu_capability": torch.backends.cpu.get_cpu_capability()},
               "overhead": overhead, "throughput": throughput}
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
