"""The command line end to end on a tiny embedded data set, and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from distill.cli import app
from distill.data import base
from distill.data.synthetic import load_synthetic
from distill.modelfile import load_model

runner = CliRunner()
TINY = ["--image-size", "32x16", "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "16", "--bench-iters", "2", "--min-steps", "0", "--teacher-min-steps", "0"]


@pytest.fixture
def tiny_data(monkeypatch):
    """`synthetic` shrunk to 8 train / 4 test identities so a whole run takes seconds."""
    small = dict(train_ids=8, test_ids=4, images_per_id=8, height=32, width=16)
    monkeypatch.setitem(base._LOADERS, "synthetic", lambda path=None, **o: load_synthetic(path, **small))


def test_run_writes_report_and_a_matching_onnx_and_reuses_the_teacher(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--teacher", "inception_bn", "--student", "nin_bn", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    for name in ("report.json", "report.md", "speed_vs_accuracy.png", "teacher.pt", "student.pt", "student.onnx"):
        assert (out / name).is_file(), name

    report = json.loads((out / "report.json").read_text())
    assert {(m["name"], m["runtime"]) for m in report["models"]} == {
        ("teacher", "torch"), ("teacher", "onnxruntime"), ("student_baseline", "torch"),
        ("student", "torch"), ("student", "onnxruntime"),
    }
    for m in report["models"]:
        assert set(m["metrics"]) >= {"recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map", "rank1"}
        assert m["latency_ms_p50"] > 0 and m["throughput_ips"] > 0 and m["params"] > 0
    by = {(m["name"], m["runtime"]): m for m in report["models"]}
    assert report["speedup"] == pytest.approx(by["teacher", "torch"]["latency_ms_p50"] / by["student", "onnxruntime"]["latency_ms_p50"])
    assert report["onnx"]["max_abs_diff"] <= 1e-4
    assert report["config"]["epochs"] == 1 and report["config"]["image_size"] == [32, 16]

    student, _ = load_model(out / "student.pt")
    images = torch.randn(3, 3, 32, 16)
    expected = student(images)[0].detach().numpy()
    got = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)

    again = runner.invoke(app, ["run", "--out", str(out), "--no-baseline", *TINY])
    assert again.exit_code == 0, again.output
    assert "reusing the teacher trained earlier" in again.output
    assert "teacher outputs read from the cache" in again.output
    assert {m["name"] for m in json.loads((out / "report.json").read_text())["models"]} == {"teacher", "student"}

    shown = runner.invoke(app, ["report", str(out)])
    assert shown.exit_code == 0 and "student" in shown.output

    # the model file remembers its input size (32x16), so eval and export need no --image-size
    evaluated = runner.invoke(app, ["eval", "--checkpoint", str(out / "student.pt")])
    assert evaluated.exit_code == 0, evaluated.output
    assert all(k in evaluated.output for k in ("recall@1", "map", "nmi", "f1"))
    quick = runner.invoke(app, ["eval", "--checkpoint", str(out / "student.pt"), "--no-clustering"])
    assert quick.exit_code == 0 and "recall@1" in quick.output and "nmi" not in quick.output and "f1" not in quick.output
    exported = runner.invoke(app, ["export", "--checkpoint", str(out / "student.pt"), "-o", str(tmp_path / "s.onnx")])
    assert exported.exit_code == 0, exported.output
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[2:] == [32, 16]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher", "resnet_huge"], "unknown teacher 'resnet_huge'; known: inception_bn"),
        (["--student", "tiny"], "unknown student 'tiny'; known: nin_bn"),
        (["--darkrank", "medium"], "--darkrank must be one of hard, soft, none"),
        (["--teacher", "timm:resnet18"], "needs local weights (nothing is downloaded)"),
        (["--teacher", "onnx:/nonexistent/t.onnx"], "ONNX teacher file not found"),
        (["--data", "nowhere"], "unknown data set 'nowhere'"),
        (["--data", "market1501:/nonexistent"], "/nonexistent"),
        (["--lr", "-1"], "lr (--lr) must be > 0, got -1"),
        (["--lr", "0"], "lr (--lr) must be > 0, got 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = runner.invoke(app, ["run", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2  # one line (rich may wrap it once)


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = runner.invoke(app, ["run", "--out", str(blocker / "sub")])
    assert result.exit_code == 2
    assert "cannot write to output directory" in result.output


def test_list_shows_every_registry():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for name in ("inception_bn", "nin_bn", "synthetic", "market1501", "triplet", "hdml-triplet"):
        assert name in result.output
