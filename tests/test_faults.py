"""Faults that used to end in a traceback or a silent mess (issue 20 items 4, 13, 14): a full disk
while writing a model file, a checkpoint or the data cache is one line naming the file; export
folders a killed run left in $TMPDIR are removed; unstable benchmark timings are marked as such."""

from __future__ import annotations

import errno
import io
import os
import tempfile

import pytest
import torch
from PIL import Image
from rich.console import Console

from distill import atomic
from distill.checkpoint import save_checkpoint
from distill.data.synthetic import load_synthetic
from distill.errors import DistillError
from distill.export import export_onnx
from distill.models import build_model, read_model_file, save_model
from distill.report import build_report, print_report, to_markdown

from test_export import tiny_net
from test_report import CONFIG, ONNX, fake_models

FULL = os.strerror(errno.ENOSPC)  # "No space left on device"


class FullDisk:
    """A file on a disk with ``room`` bytes left: writes beyond it fail with ENOSPC, like a real one."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            raise OSError(errno.ENOSPC, FULL)
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    real = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, *a, **k: FullDisk(real(fd, *a, **k), room=4096))


def test_a_full_disk_while_writing_a_model_file_is_one_line_naming_it(tmp_path, full_disk):
    path = tmp_path / "student.pt"
    (tmp_path / "student.pt").write_bytes(b"the previous model")
    with pytest.raises(DistillError) as err:
        save_model(path, build_model("nin_bn", 8, 4, 0.25), arch="nin_bn", width=0.25)
    assert str(err.value) == f"cannot write {path}: {FULL} (free disk space or choose another location)"
    assert err.value.exit_code == 1
    assert path.read_bytes() == b"the previous model" and sorted(p.name for p in tmp_path.iterdir()) == ["student.pt"]


def test_a_full_disk_while_writing_a_checkpoint_says_so(tmp_path, full_disk):
    path = tmp_path / "teacher.ckpt"
    with pytest.raises(DistillError) as err:
        save_checkpoint(path, {"model": torch.zeros(10_000), "epoch": 3})
    assert str(err.value) == (f"cannot write checkpoint {path}: {FULL}; the previous checkpoint is kept "
                              "(free disk space or choose another --out)")
    assert list(tmp_path.iterdir()) == []


def test_a_full_data_cache_is_one_line_naming_it(tmp_path, monkeypatch):
    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, FULL)

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(DistillError, match=rf"^cannot write the embedded data set to {tmp_path}/synthetic-\w+: {FULL} "
                                           r"\(free disk space, or set DISTILL_CACHE to a directory with room\)$"):
        load_synthetic(str(tmp_path), train_ids=2, test_ids=2, images_per_id=2, height=32, width=16)
    assert list(tmp_path.iterdir()) == []  # the half-rendered set is gone


def test_export_folders_left_by_a_killed_run_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / "distill-export-999999999-abcd1234"  # no such process (a SIGKILLed export)
    old = tmp_path / "distill-export-k2j4h5g6"  # written before folders carried their pid
    live = tmp_path / f"distill-export-{os.getpid()}-zz"  # an export in progress
    for folder in (dead, old, live):
        folder.mkdir()
        (folder / "fp32.onnx").write_bytes(b"half an onnx file")
    (tmp_path / "unrelated").mkdir()
    with pytest.warns(UserWarning, match=r"removed 2 ONNX export folder\(s\) left by an interrupted run: "
                                         rf"{dead.name}, {old.name}"):
        export_onnx(tiny_net(), tmp_path / "out" / "m.onnx", (16, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "unrelated", "out"])


def rendered(report) -> tuple[str, str]:
    buf = io.StringIO()
    print_report(report, Console(file=buf, width=400))
    return " ".join(buf.getvalue().split()), to_markdown(report)


def test_unstable_timings_and_speedups_from_them_are_marked():
    models = fake_models(0)
    stable_console, stable_md = rendered(build_report(models, CONFIG, ONNX))
    assert "?" not in stable_console and "?" not in stable_md
    for m in models:
        m["stable"] = not (m["name"] == "teacher" and m["runtime"] == "torch")  # the teacher's PyTorch timing was noisy
    report = build_report(models, CONFIG, ONNX)
    by = {(m["name"], m["runtime"]): m for m in report["models"]}
    assert by["teacher", "torch"]["speedup_stable"] is False and by["student", "onnxruntime"]["speedup_stable"] is False
    assert by["student", "onnxruntime"]["speedup_like_for_like_stable"] is True  # teacher and student both in ORT
    assert by["student", "torch"]["speedup_like_for_like_stable"] is False
    console, md = rendered(report)
    p50 = by["teacher", "torch"]["latency_ms_p50"]
    for text in (console, md):
        assert f"{p50:.3g}?" in text and "= from a timing that was not stable" in text
        assert f"deployment speedup (teacher in PyTorch eager -> student in ONNX Runtime): {report['speedup']:.2f}x?" in text
        like = report["speedup_like_for_like"]
        assert f"PyTorch {like['torch']:.2f}x?, ONNX Runtime {like['onnxruntime']:.2f}x " in " ".join(text.split()) + " "
