"""Fault sweep: bad inputs and faults fed to the ``distill`` command line, one subprocess each.

Each case runs ``python -m distill.cli ...`` (from the checkout this script is in) with tiny settings
on a tiny generated ImageFolder, under a timeout, and is classified as

- ``one-line``: a non-zero exit without a traceback (the message is its last line),
- ``traceback``: a Python traceback was printed,
- ``hang``: still running at the timeout (killed),
- ``exit0``: it succeeded.

A case states what it expects (almost always ``one-line``; ``exit0`` where success is right) and may
check its result further (a file that must be gone, a recorded value); a case whose class or check
differs from what it expects is listed as a failure. The catalogue covers issue 20 (items 1-14 as far
as the command line reproduces them); docs/errors.md lists each case with its message.

    python benchmarks/fault_sweep.py                      # all cases, a few minutes on 2 CPU cores
    python benchmarks/fault_sweep.py --only report --json sweep.json
    python benchmarks/fault_sweep.py --skip-slow          # without the torchrun case

Writes a JSON file (``--json``, default ``fault_sweep.json`` in the work directory) with every case's
class, exit code, seconds and message, and the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
# tiny settings shared by every case that gets as far as training
TINY = [
    "--image-size", "32x32", "--epochs", "1", "--teacher-epochs", "1", "--min-steps", "0", "--teacher-min-steps", "0",
    "--batch-size", "8", "--images-per-id", "2", "--bench-iters", "2", "--no-clustering", "--export-precision", "fp32",
    "--device", "cpu", "--val-fraction", "0", "--embed-dim", "16", "--student-width", "0.25",
]
# the same for train-teacher, which takes no student, export or report option
TINY_TEACHER = [
    "--image-size", "32x32", "--teacher-epochs", "1", "--teacher-min-steps", "0", "--batch-size", "8", "--images-per-id", "2",
    "--device", "cpu", "--val-fraction", "0", "--embed-dim", "16",
]


@dataclass
class Case:
    """One command line (the words after ``distill``; ``{w}`` is the work directory) and what it should give."""

    name: str
    item: int
    argv: list[str]
    expect: str = "one-line"
    before: Callable[[Path], None] | None = None  # set up files or processes in the work directory
    check: Callable[[Path], str | None] | None = None  # after the run: what is wrong, or None
    env: dict[str, str] = field(default_factory=dict)
    fsize: int | None = None  # RLIMIT_FSIZE in bytes: a write beyond it fails (EFBIG), like a full disk
    timeout: float | None = None
    prefix: list[str] | None = None  # another launcher than ``python -m distill.cli`` (torchrun)
    slow: bool = False


# ---------------------------------------------------------------- fixtures in the work directory


def png(path: Path, width: int, height: int, seed: int) -> None:
    """A small valid RGB PNG (no PIL needed): stripes whose colour depends on ``seed``."""
    row = b"\0" + bytes((seed * 37 + x * 11 + c * 90) % 256 for x in range(width) for c in range(3))
    raw = b"".join(row for _ in range(height))
    write_png(path, width, height, zlib.compress(raw))


def write_png(path: Path, width: int, height: int, idat: bytes) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def make_folder(root: Path, classes: int = 8, images: int = 6) -> None:
    for c in range(classes):
        for i in range(images):
            png(root / f"c{c:02d}" / f"{i}.png", 32, 32, seed=c * 100 + i)


def hostile_folder(w: Path) -> None:
    """The tiny folder plus a PNG whose header claims 30000 x 30000 and a FIFO named like an image."""
    root = w / "hostile"
    if root.exists():
        shutil.rmtree(root)
    make_folder(root)
    write_png(root / "c00" / "bomb.png", 30000, 30000, zlib.compress(b"\0" * 16))
    os.mkfifo(root / "c00" / "pipe.png")


def write(path: str, data: str | bytes) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        target = w / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data if isinstance(data, bytes) else data.encode())

    return setup


def edited_report(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """A copy of the base run's report.json with one field broken."""

    def setup(w: Path) -> None:
        report = json.loads((w / "base" / "report.json").read_text())
        edit(report)
        (w / "badreport").mkdir(exist_ok=True)
        (w / "badreport" / "report.json").write_text(json.dumps(report))

    return setup


# ---------------------------------------------------------------- a run interrupted mid-teacher (items 1-3)

BACKGROUND: dict[str, subprocess.Popen] = {}
LONG = [*TINY, "--teacher-epochs", "400"]  # long enough to be interrupted while the teacher trains


def start_long_run(w: Path) -> None:
    """``run --out L`` in the background until it has written a teacher checkpoint (it holds L's lock)."""
    out = w / "L"
    proc = subprocess.Popen(command(["run", "--data", f"imagefolder:{w / 'folder'}", *LONG, "--out", str(out)]),
                            cwd=w, env=environment(w, {}), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    BACKGROUND["L"] = proc
    deadline = time.monotonic() + 180
    while not list(out.glob("*.ckpt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)


def interrupt_long_run(w: Path) -> None:
    """Ctrl-C the background run (a checkpoint of the unfinished teacher is left)."""
    proc = BACKGROUND.pop("L", None)
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def checkpoints_kept(w: Path) -> str | None:
    return None if list((w / "L").glob("teacher*.ckpt")) else "the unfinished teacher checkpoint is gone"


def stale_export_dir(w: Path) -> None:
    """A ``$TMPDIR/distill-export-<dead pid>-x`` folder, as a SIGKILL during export leaves behind."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
            pid += 1
        except ProcessLookupError:
            break
        except PermissionError:
            pid += 1
    (w / "tmp" / f"distill-export-{pid}-stale").mkdir(parents=True, exist_ok=True)


def no_stale_export_dir(w: Path) -> str | None:
    left = list((w / "tmp").glob("distill-export-*"))
    return f"left behind: {', '.join(p.name for p in left)}" if left else None


def one_benchmark_thread(w: Path) -> str | None:
    try:
        report = json.loads((w / "T" / "report.json").read_text())
    except (OSError, ValueError):
        return "no report.json"
    threads = (report.get("machine") or {}).get("threads")
    return None if threads == 1 else f"benchmarked with {threads} thread(s) although OMP_NUM_THREADS=1"


# ---------------------------------------------------------------- the catalogue


def catalogue(w: Path) -> list[Case]:
    data = ["--data", f"imagefolder:{w / 'folder'}"]
    run = ["run", *data, *TINY]
    out = ["--out", str(w / "o")]
    student = str(w / "base" / "student.pt")
    rec = lambda text: write("recipes.toml", text)  # noqa: E731
    cfg = lambda text: write("c.toml", text)  # noqa: E731
    bad_report = "badreport"
    return [
        # item 1-3: resume, unfinished checkpoints, the --out lock (a run interrupted mid-teacher)
        Case("study-on-locked-out", 3, ["study", *data, *TINY, "--seeds", "1", "--out", str(w / "L")], before=start_long_run),
        Case("run-on-locked-out", 3, [*run, "--teacher-epochs", "400", "--out", str(w / "L")]),
        Case("rerun-without-resume", 2, [*run, "--teacher-epochs", "400", "--out", str(w / "L")],
             before=interrupt_long_run, check=checkpoints_kept, timeout=60),
        Case("resume-other-seed", 1, [*run, "--teacher-epochs", "400", "--out", str(w / "L"), "--resume", "--seed", "1"],
             check=checkpoints_kept, timeout=60),
        # (the interrupted run is in its teacher: --student-width would rightly let the teacher go on)
        Case("resume-other-teacher-lr", 1, [*run, "--teacher-epochs", "400", "--out", str(w / "L"), "--resume", "--teacher-lr", "0.01"],
             check=checkpoints_kept, timeout=60),
        Case("resume-other-data", 1, ["run", "--data", f"imagefolder:{w / 'folder2'}", *LONG, "--out", str(w / "L"), "--resume"],
             check=checkpoints_kept, timeout=60),
        # item 4: a write that fails (file size limit: EFBIG, as a full disk fails with ENOSPC)
        Case("disk-full-teacher", 4, ["train-teacher", *data, *TINY_TEACHER, "--out", str(w / "D")], fsize=200_000),
        Case("disk-full-export", 4, ["export", "--checkpoint", student, "-o", str(w / "full.onnx")], fsize=20_000),
        # item 5: type-checked config files and recipes
        *(Case(f"toml-{key}", 5, [*run, "--config", str(w / "c.toml"), *out], before=cfg(f"{key} = {value}\n"))
          for key, value in [("student", "5"), ("device", "0"), ("teacher", "1"), ("data", '["x"]'), ("export_precision", "32"),
                             ("epochs", '"three"'), ("target_accuracy", '"high"'), ("seed", '"x"'), ("run", "5"),
                             ("resume", '"no"'), ("amp", '"no"'), ("darkrank_list_size", "2.5"), ("loss_options", "5")]),
        Case("toml-not-utf8", 5, [*run, "--config", str(w / "c.toml"), *out], before=cfg(b'data = "caf\xe9"\n')),
        Case("recipe-loss-options-5", 5, ["study", *data, *TINY, "--recipes-file", str(w / "recipes.toml"), *out],
             before=rec('[[recipe]]\nname = "x"\nloss_options = 5\n')),
        Case("recipe-list-of-ints", 5, ["study", *data, *TINY, "--recipes-file", str(w / "recipes.toml"), *out],
             before=rec("recipe = [1, 2]\n")),
        Case("recipes-not-utf8", 5, ["study", *data, *TINY, "--recipes-file", str(w / "recipes.toml"), *out],
             before=rec(b'[[recipe]]\nname = "caf\xe9"\n')),
        # item 6: values that passed validation, then crashed
        Case("seed-negative", 6, [*run, "--seed", "-1", *out]),
        Case("device-cudax", 6, [*run, "--device", "cudax", *out]),
        Case("device-cuda-abc", 6, [*run, "--device", "cuda:abc", *out]),
        Case("student-width-inf", 6, [*run, "--student", "nin_bn@inf", *out]),
        Case("bench-device-cudax", 6, ["bench", "--checkpoint", student, "--device", "cudax"]),
        # item 7: user text is not rich markup
        Case("markup-teacher", 7, [*run, "--teacher", "[/x]", *out]),
        Case("markup-data", 7, ["run", *TINY, "--data", "imagefolder:/tmp/a[/b]", *out]),
        Case("markup-config", 7, [*run, "--config", "cfg/[/nope].toml", *out]),
        Case("markup-student", 7, [*run, "--student", "nin_bn,[bold]x", *out]),
        Case("markup-recipe-hint", 7, ["study", *data, *TINY, "--recipes-file", str(w / "recipes.toml"), *out],
             before=rec("distill = \"kd=1\"\n")),
        # item 8: hostile image files
        Case("bomb-and-fifo", 8, ["run", "--data", f"imagefolder:{w / 'hostile'}", *TINY, "--strict", *out], before=hostile_folder,
             timeout=60),
        # item 9: a malformed report.json
        Case("report-no-models", 9, ["report", str(w / bad_report)], before=edited_report(lambda r: r.update(models=[]))),
        Case("report-metrics-5", 9, ["report", str(w / bad_report)], before=edited_report(lambda r: r["models"][0].update(metrics=5))),
        Case("report-latency-fast", 9, ["report", str(w / bad_report)],
             before=edited_report(lambda r: r["models"][0].update(latency_ms_p50="fast"))),
        Case("report-speedup-null", 9, ["report", str(w / bad_report)],
             before=edited_report(lambda r: r.update(speedup_like_for_like=None))),
        # item 10: the README's students (exit 0 expected: trained with the tiny settings)
        Case("readme-student-list", 10, [*run, "--student", "nin_bn@0.25,timm:mobilenetv3_small_050", "--out", str(w / "R")],
             expect="exit0", slow=True),
        # item 11: checked before training
        Case("images-per-id-1", 11, [*run, "--images-per-id", "1", *out]),
        Case("compat-embed-dim", 11, [*run, "--distill", "kd=3,darkrank=0.02,compat=1", "--embed-dim", "64", "--teacher-layer", "backbone.blocks.3a", *out],
             timeout=240),
        Case("loss-opt-negative-margin", 11, [*run, "--loss-opt", "triplet_margin=-1", *out]),
        Case("synthetic-split-file", 11, ["run", *TINY, "--split-file", "split.txt", *out]),
        Case("synthetic-cuhk03-variant", 11, ["run", *TINY, "--cuhk03-variant", "detected", *out]),
        # item 12: messages say what is wrong
        Case("config-is-a-directory", 12, [*run, "--config", str(w), *out]),
        Case("bench-json-in-proc", 12, ["bench", "--checkpoint", student, "--iters", "2", "--json", "/proc/x.json"]),
        Case("export-under-a-file", 12, ["export", "--checkpoint", student, "-o", f"{student}/x.onnx"]),
        # item 13: a SIGKILLed export's temp folder is cleaned by the next export
        Case("stale-export-dir", 13, ["export", "--checkpoint", student, "-o", str(w / "e.onnx")], expect="exit0",
             before=stale_export_dir, check=no_stale_export_dir),
        # item 14: torchrun with OMP_NUM_THREADS=1 benchmarks with one thread
        Case("torchrun-threads", 14, [*run, "--out", str(w / "T")], expect="exit0", env={"OMP_NUM_THREADS": "1"},
             prefix=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "distill.cli"],
             check=one_benchmark_thread, timeout=400, slow=True),
    ]


# ---------------------------------------------------------------- running and classifying


def command(argv: list[str], prefix: list[str] | None = None) -> list[str]:
    return [*(prefix or [sys.executable, "-m", "distill.cli"]), *argv]


def environment(w: Path, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DISTILL_CACHE=str(w / "cache"), TMPDIR=str(w / "tmp"), COLUMNS="400",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return env | extra


def classify(returncode: int | None, output: str) -> str:
    if returncode is None:
        return "hang"
    if "Traceback (most recent call last)" in output:
        return "traceback"
    return "exit0" if returncode == 0 else "one-line"


def run_case(case: Case, w: Path, timeout: float) -> dict:
    if case.before is not None:
        case.before(w)

    def limit() -> None:
        if case.fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.fsize, case.fsize))

    started = time.monotonic()
    proc = subprocess.Popen(command(case.argv, case.prefix), cwd=w, env=environment(w, case.env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True, preexec_fn=limit)
    try:
        output, _ = proc.communicate(timeout=case.timeout or timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
    kind = classify(code, output)
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    problem = case.check(w) if case.check is not None and kind != "hang" else None
    return {
        "name": case.name, "item": case.item, "class": kind, "expect": case.expect, "exit_code": code,
        "seconds": round(time.monotonic() - started, 1), "message": lines[-1] if lines else "", "problem": problem,
        "ok": kind == case.expect and problem is None, "command": "distill " + " ".join(case.argv).replace(str(w), "W"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    parser.add_argument("--skip-slow", action="store_true", help="leave out the cases that train whole runs")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    parser.add_argument("--json", type=Path, help="where to write the results (default: WORK/fault_sweep.json)")
    parser.add_argument("--work", type=Path, help="work directory (default: a new temp directory)")
    args = parser.parse_args()

    w = (args.work or Path(tempfile.mkdtemp(prefix="distill-sweep-"))).resolve()
    (w / "tmp").mkdir(parents=True, exist_ok=True)
    make_folder(w / "folder")
    make_folder(w / "folder2", classes=10)
    cases = [c for c in catalogue(w) if (not args.only or args.only in c.name) and not (args.skip_slow and c.slow)]
    print(f"work directory {w}; building the base run (teacher, student, report) ...", flush=True)
    base = subprocess.run(command(["run", "--data", f"imagefolder:{w / 'folder'}", *TINY, "--out", str(w / "base")]),
                          cwd=w, env=environment(w, {}), capture_output=True, text=True)
    if base.returncode != 0:
        print(base.stdout[-2000:], base.stderr[-2000:], sep="\n")
        return 1
    results = []
    try:
        for case in cases:
            result = run_case(case, w, args.timeout)
            results.append(result)
            mark = "ok  " if result["ok"] else "FAIL"
            print(f"{mark} {result['item']:>2} {result['name']:<28} {result['class']:<9} {result['seconds']:>6.1f}s  "
                  f"{result['message'][:150]}{'  [' + result['problem'] + ']' if result['problem'] else ''}", flush=True)
    finally:
        interrupt_long_run(w)
    counts = {kind: sum(r["class"] == kind for r in results) for kind in ("one-line", "traceback", "hang", "exit0")}
    summary = {"cases": len(results), **counts, "as_expected": sum(r["ok"] for r in results)}
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    path = args.json or w / "fault_sweep.json"
    path.write_text(json.dumps({"summary": summary, "cases": results}, indent=2) + "\n")
    print(f"results: {path}")
    return 0 if summary["as_expected"] == summary["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
